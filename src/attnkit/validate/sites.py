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

from dataclasses import dataclass, field

import torch
from torch import nn

from attnkit.discover.attention import find_attention, unmatched_softmax
from attnkit.discover.capture import capture
from attnkit.discover.runtime import AttentionCall, intercept_attention
from attnkit.discover.site import SiteRecord
from attnkit.errors import CaptureError
from attnkit.ops import AttentionSpec, attention_spec
from attnkit.utils.dtypes import parse_dtype
from attnkit.utils.modules import model_device, model_dtype

__all__ = ["AttentionLayer", "find_layers", "spec_from_json"]

_Found = tuple  # (SiteRecord, kind, AttentionSpec, blockers) of one recorded call


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


def _mha_blockers(kwargs: dict) -> list[str]:
    if kwargs.get("need_weights", True):
        return ["need_weights=True (the default): the layer returns attention probabilities, so it computes explicit softmax; pass need_weights=False"]
    return []


def _mha_found(name: str, module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> _Found:
    site = SiteRecord.of_module_call(name, module, args, kwargs)
    query = args[0] if args else kwargs["query"]
    return site, "nn.MultiheadAttention", site.spec(device=query.device.type, dtype=query.dtype), _mha_blockers(kwargs)


def _record(model: nn.Module, example_inputs: tuple, example_kwargs: dict) -> list[_Found]:
    stack: list[str] = []
    found: list[_Found] = []

    def pre_hook(name):
        def hook(module, args, kwargs):
            stack.append(name)
            if isinstance(module, nn.MultiheadAttention):
                found.append(_mha_found(name, module, args, kwargs))

        return hook

    def post_hook(module, args, kwargs, output):
        stack.pop()

    def on_sdpa(call: AttentionCall, original):
        owner = stack[-1] if stack else "<model>"
        if not (found and found[-1][0].path == owner and found[-1][1] == "nn.MultiheadAttention"):
            spec = attention_spec(call.q, call.k, call.v, mask=call.mask, causal=call.causal, scale=call.scale, dropout_p=call.dropout_p)
            found.append((call.site(owner), "sdpa", spec, []))
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


_EXPLICIT = "written as matmul + softmax: no backend runs it until the layer calls F.scaled_dot_product_attention"


def _from_graph(model: nn.Module, example_inputs: tuple, example_kwargs: dict, notes: list[str]) -> list[_Found]:
    """Attention found by ``attnkit.discover`` pattern matching on a captured graph; none if export fails
    (``notes`` then says so, and also when the graph holds softmax ops that match no attention pattern)."""
    try:
        captured = capture(model, example_inputs, example_kwargs)
    except CaptureError as error:  # a fallback here: a model torch.export cannot capture just has no graph sites
        notes.append(f"graph capture failed, so attention written as matmul + softmax was not looked for ({' '.join(str(error).split())[:300]})")
        return []
    device, dtype = model_device(model).type, model_dtype(model)
    sites = find_attention(captured)
    found = [(site.record, "graph", site.record.spec(device=device, dtype=dtype), [_EXPLICIT] if site.form != "sdpa" else []) for site in sites]
    softmaxes = unmatched_softmax(captured.graph_module.graph, sites)
    if softmaxes and not found:
        notes.append(f"the captured graph has {softmaxes} softmax op(s) that match no attention pattern (block-sparse or gathered "
                     "attention, for instance): nothing validates them")  # fmt: skip
    return found


def find_layers(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None, *, notes: list[str] | None = None) -> list[AttentionLayer]:
    """The attention layers of ``model`` as called on the example inputs, grouped by spec.

    ``notes`` (if given) gets why graph capture could not look for attention, or the softmax ops it saw but did not recognise.
    """
    example_kwargs = example_kwargs or {}
    notes = notes if notes is not None else []
    found = _record(model, example_inputs, example_kwargs) or _from_graph(model, example_inputs, example_kwargs, notes)
    layers: dict[tuple, AttentionLayer] = {}
    for site, kind, spec, blockers in found:
        key = (kind, spec, tuple(blockers), site.explicit_scale)
        if key in layers:
            layers[key].names.append(site.path)
        else:
            layers[key] = AttentionLayer([site.path], kind, spec.to_json(), blockers, site.explicit_scale)
    return list(layers.values())
