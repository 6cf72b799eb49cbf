"""Find a model's attention layers and their real call shapes by running it once.

Every ``F.scaled_dot_product_attention`` call is recorded (:mod:`attnkit.discover.runtime`) and named
after the innermost module that made it; ``nn.MultiheadAttention`` layers are recorded by
module type, with the reasons they leave the fused path (``need_weights=True`` makes them
compute explicit softmax weights, which no fused kernel returns). Recording comes first
because it sees what an exported graph has lowered away (module names, ``need_weights``, the
real mask tensors); when it finds nothing (attention written as matmul + softmax, e.g. HF
``attn_implementation="eager"``), ``attnkit.discover`` capture and pattern matching are tried.
Layers with the same call description are grouped into one :class:`AttentionLayer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from attnkit.discover.attention import find_attention
from attnkit.discover.capture import capture
from attnkit.discover.runtime import AttentionCall, intercept_attention
from attnkit.errors import CaptureError
from attnkit.ops import AttentionSpec, attention_spec
from attnkit.utils.dtypes import parse_dtype
from attnkit.utils.modules import model_device, model_dtype

__all__ = ["AttentionLayer", "find_layers", "spec_from_json"]

_Found = tuple  # (name, kind, AttentionSpec, blockers, scale) of one recorded call


@dataclass
class AttentionLayer:
    """Attention layers of a model that make the same call (grouped by their spec)."""

    names: list[str]
    """Module names (fqn) of the layers, in call order."""
    kind: str
    """``"sdpa"`` (calls F.scaled_dot_product_attention), ``"nn.MultiheadAttention"`` or ``"graph"``."""
    spec: dict
    """``AttentionSpec.to_json()`` of the call (real batch, heads, sequence lengths, dtype, mask kind)."""
    blockers: list[str] = field(default_factory=list)
    """Why fused backends cannot serve these layers as written (e.g. ``need_weights=True``)."""
    scale: float | None = None
    """Softmax scale the layers pass; None = the default ``1/sqrt(D)``."""

    @property
    def attention_spec(self) -> AttentionSpec:
        return spec_from_json(self.spec)


def spec_from_json(record: dict) -> AttentionSpec:
    """Inverse of ``AttentionSpec.to_json``."""
    return AttentionSpec(**{**record, "dtype": parse_dtype(record["dtype"])})


def _explicit_scale(scale: float | None, head_dim: int) -> float | None:
    """``scale``, or None when it is the default ``1/sqrt(D)`` (so equal layers group together)."""
    return None if scale is None or math.isclose(scale * math.sqrt(head_dim), 1.0, rel_tol=1e-6) else float(scale)


def _mha_blockers(kwargs: dict) -> list[str]:
    if kwargs.get("need_weights", True):
        return ["need_weights=True (the default): the layer returns attention probabilities, so it computes explicit softmax; pass need_weights=False"]
    return []


def _mha_spec(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> AttentionSpec:
    query, key = args[0], args[1] if len(args) > 1 else kwargs["key"]
    batch_dim = 0 if module.batch_first else 1
    mask = kwargs.get("attn_mask") if kwargs.get("attn_mask") is not None else kwargs.get("key_padding_mask")
    return AttentionSpec(
        batch=query.shape[batch_dim] if query.dim() == 3 else 1,
        heads_q=module.num_heads,
        seq_q=query.shape[-2] if module.batch_first or query.dim() == 2 else query.shape[0],
        seq_kv=key.shape[-2] if module.batch_first or key.dim() == 2 else key.shape[0],
        head_dim=module.head_dim,
        device=query.device.type,
        dtype=query.dtype,
        mask="none" if mask is None else ("bool" if mask.dtype == torch.bool else "additive"),
        causal=bool(kwargs.get("is_causal", False)) and mask is None,
        dropout_p=module.dropout if module.training else 0.0,
    )


def _record(model: nn.Module, example_inputs: tuple, example_kwargs: dict) -> list[_Found]:
    stack: list[str] = []
    found: list[_Found] = []

    def pre_hook(name):
        def hook(module, args, kwargs):
            stack.append(name)
            if isinstance(module, nn.MultiheadAttention):
                found.append((name, "nn.MultiheadAttention", _mha_spec(module, args, kwargs), _mha_blockers(kwargs), None))

        return hook

    def post_hook(module, args, kwargs, output):
        stack.pop()

    def on_sdpa(call: AttentionCall, original):
        owner = stack[-1] if stack else "<model>"
        if not (found and found[-1][0] == owner and found[-1][1] == "nn.MultiheadAttention"):
            spec = attention_spec(call.q, call.k, call.v, mask=call.mask, causal=call.causal, scale=call.scale, dropout_p=call.dropout_p)
            found.append((owner, "sdpa", spec, [], _explicit_scale(call.scale, spec.head_dim)))
        return original()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre_hook(name or "<model>"), with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
    try:
        with torch.no_grad(), intercept_attention(on_sdpa):
            model(*example_inputs, **example_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return found


_GRAPH_MASKS = {"none": "none", "causal": "none", "padding": "bool", "bool": "bool", "additive": "additive"}
_EXPLICIT = "written as matmul + softmax: no backend runs it until the layer calls F.scaled_dot_product_attention"


def _from_graph(model: nn.Module, example_inputs: tuple, example_kwargs: dict) -> list[_Found]:
    """Attention found by ``attnkit.discover`` pattern matching on a captured graph; none if export fails."""
    try:
        captured = capture(model, example_inputs, example_kwargs)
    except CaptureError:  # a fallback here: a model torch.export cannot capture just has no graph sites
        return []
    sites = find_attention(captured)
    found = []
    for site in sites:
        spec = AttentionSpec(
            batch=site.batch,
            heads_q=site.num_heads,
            heads_kv=site.num_kv_heads,
            seq_q=site.seq_q,
            seq_kv=site.seq_kv,
            head_dim=site.head_dim_qk,
            head_dim_v=site.head_dim_v,
            device=model_device(model).type,
            dtype=model_dtype(model),
            mask=_GRAPH_MASKS.get(site.mask, "additive"),
            causal=site.causal,
        )
        found.append((site.name, "graph", spec, [_EXPLICIT] if site.form != "sdpa" else [], _explicit_scale(site.scale, spec.head_dim)))
    return found


def find_layers(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> list[AttentionLayer]:
    """The attention layers of ``model`` as called on the example inputs, grouped by spec."""
    example_kwargs = example_kwargs or {}
    found = _record(model, example_inputs, example_kwargs) or _from_graph(model, example_inputs, example_kwargs)
    layers: dict[tuple, AttentionLayer] = {}
    for name, kind, spec, blockers, scale in found:
        key = (kind, spec, tuple(blockers), scale)
        if key in layers:
            layers[key].names.append(name)
        else:
            layers[key] = AttentionLayer([name], kind, spec.to_json(), blockers, scale)
    return list(layers.values())
