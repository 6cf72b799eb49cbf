"""`HFAttention`: one drop-in replacement for the attention modules of the transformers families.

It keeps the original's call signature and return tuple, runs Q/K/V (or K/V for cross
attention) as one GEMM, and sends the core to ``attnkit.ops`` with the mask semantics that
transformers' SDPA integration uses:

- ``attention_mask`` is None, bool (True = attend) or additive float, ``(B, 1, Sq, Skv)``;
- without a mask a causal module runs ``causal=True`` when ``Sq > 1``; when a static cache hands
  more keys than queries (empty-cache prefill) the keys are cut to ``Sq`` first, as transformers
  does, because its causal mask is top-left aligned and attnkit's bottom-right;
- T5's relative position bias is added to the scores (no ``1/sqrt(D)`` scaling, ``scale=1``);
- Llama's rotary embedding is applied with the model's own ``apply_rotary_pos_emb``;
- caches are updated as the original does (self attention: ``update``; cross attention:
  computed once per ``EncoderDecoderCache``, flagged in ``is_updated``).

The state dict keeps the original's keys: the fused ``qkv`` parameter is split into the original
``query``/``key``/``value`` (or ``q_proj``...) entries on save and concatenated on load.
"""

from __future__ import annotations

import inspect
import sys

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.optimize.core import AttentionCore
from attnkit.optimize.families import Family

__all__ = ["HFAttention"]

# Attributes that transformers code reads from attention modules (layer index for caches, ...).
_COPIED_ATTRIBUTES = (
    "config", "layer_idx", "is_causal", "is_cross_attention", "is_decoder", "scaling", "num_key_value_groups",
    # T5's compute_bias reads these from the instance.
    "has_relative_attention_bias", "relative_attention_num_buckets", "relative_attention_max_distance",
    "_relative_position_bucket",
)  # fmt: skip
# Attributes holding the attention-probability dropout, a float or an nn.Dropout.
_DROPOUT_ATTRIBUTES = ("attention_dropout", "attn_dropout", "dropout")
_HEAD_DIM_ATTRIBUTES = ("head_dim", "attention_head_size", "key_value_proj_dim")


def _attention_dropout(module: nn.Module) -> tuple[float, str | None]:
    """(probability, child name when it is an ``nn.Dropout`` child) of the attention-probability dropout."""
    for name in _DROPOUT_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, nn.Dropout):
            return float(value.p), name
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
    return 0.0, None


def _head_dim(module: nn.Module) -> int:
    for name in _HEAD_DIM_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, int):
            return value
    raise AssertionError(f"{type(module).__name__} has none of {_HEAD_DIM_ATTRIBUTES}; match_family should have refused it")


class HFAttention(nn.Module):
    """A transformers attention module rewritten: fused input projection + ``attnkit.ops`` core.

    Build with :meth:`from_original`; the instance is an ordinary ``nn.Module`` (trainable,
    ``torch.compile``-able) whose ``forward`` accepts the original's arguments.
    """

    def __init__(self, original: nn.Module, family: Family, *, fuse_qkv: bool = True, backend: str = "auto"):
        super().__init__()
        self.family = family
        self.original_class = type(original)
        for name in _COPIED_ATTRIBUTES:
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))
        head_dim = _head_dim(original)
        self._layer_idx = getattr(original, "layer_idx", None)
        self._causal = bool(getattr(original, "is_causal", False))
        signature = inspect.signature(type(original).forward).parameters
        self._positional = tuple(
            name for name, p in list(signature.items())[2:] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        )
        self._rotary = "position_embeddings" in signature
        self._position_bias = "position_bias" in signature
        if self._rotary:
            self._apply_rotary = getattr(sys.modules[type(original).__module__], "apply_rotary_pos_emb")

        # Children the rewrite keeps under their original names (output projection, T5's bias table...);
        # the attention-probability dropout moves into the core.
        dropout_p, dropout_child = _attention_dropout(original)
        fused = set(family.qkv or ()) if fuse_qkv else set()
        for name, child in original.named_children():
            if name not in fused and name != dropout_child:
                self.add_module(name, child)

        if family.packed is not None:
            self.projection = "packed"
            q_width = kv_width = int(original.split_size)
        else:
            q_proj, k_proj, v_proj = (getattr(original, name) for name in family.qkv)
            q_width, kv_width = q_proj.out_features, k_proj.out_features
            self.projection = "fused" if fuse_qkv else "separate"
            if fuse_qkv:
                self.qkv = _fuse_linears(q_proj, k_proj, v_proj)
                self._register_state_dict_hook(_split_qkv_on_save)
                self._register_load_state_dict_pre_hook(_fuse_qkv_on_load, with_module=True)
        self._widths = (q_width, kv_width)
        self.core = AttentionCore(
            num_heads=q_width // head_dim,
            num_kv_heads=kv_width // head_dim,
            head_dim=head_dim,
            scale=float(getattr(original, "scaling", head_dim**-0.5)),
            dropout_p=dropout_p,
            backend=backend,
        )

    @classmethod
    def from_original(cls, original: nn.Module, family: Family, *, fuse_qkv: bool = True, backend: str = "auto") -> "HFAttention":
        """Rewrite ``original`` (its parameters are shared or concatenated, never re-initialised)."""
        module = cls(original, family, fuse_qkv=fuse_qkv, backend=backend)
        module.train(original.training)
        return module

    def extra_repr(self) -> str:
        return f"family={self.family.name}, projection={self.projection}, original={self.original_class.__name__}"

    # -- projections -------------------------------------------------------------------------

    def _project(self, x: torch.Tensor, kv_x: torch.Tensor | None, need_kv: bool = True):
        """(q, k, v) as ``(B, S, H*D)``: self attention when ``kv_x`` is None; k, v None unless ``need_kv``."""
        q_width, kv_width = self._widths
        family = self.family
        if kv_x is None:
            if self.projection == "packed":
                return getattr(self, family.packed)(x).split(q_width, dim=-1)
            if self.projection == "fused":  # one GEMM
                return self.qkv(x).split((q_width, kv_width, kv_width), dim=-1)
            return tuple(getattr(self, name)(x) for name in family.qkv)
        if self.projection == "packed":
            q = getattr(self, family.packed_cross_q)(x)
            kv = getattr(self, family.packed)(kv_x).split(kv_width, dim=-1) if need_kv else (None, None)
        elif self.projection == "fused":  # one GEMM for K and V: row slices of the fused weight
            weight, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x, weight[:q_width], None if bias is None else bias[:q_width])
            kv = (None, None)
            if need_kv:
                kv = F.linear(kv_x, weight[q_width:], None if bias is None else bias[q_width:]).split(kv_width, dim=-1)
        else:
            q = getattr(self, family.qkv[0])(x)
            kv = tuple(getattr(self, name)(kv_x) for name in family.qkv[1:]) if need_kv else (None, None)
        return (q, *kv)

    # -- forward -----------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        kwargs.update(zip(self._positional, args))
        family, core = self.family, self.core
        kv_states = kwargs.get(family.kv_arg) if family.kv_arg else None
        cross = kv_states is not None
        mask = kwargs.get(family.cross_mask_arg if cross and family.cross_mask_arg else family.mask_arg)
        cache = kwargs.get("past_key_values")
        batch, seq = hidden_states.shape[:2]

        cache_layer, reuse = _cache_for(cache, cross, self._layer_idx)
        past_seen = cache.get_seq_length(self.layer_idx) if (cache is not None and self._position_bias) else 0
        q, k, v = self._project(hidden_states, kv_states if cross else None, need_kv=not reuse)
        q = q.view(batch, seq, -1, core.head_dim).transpose(1, 2)  # (B, Hq, Sq, D)
        if reuse:
            k, v = cache_layer.layers[self.layer_idx].keys, cache_layer.layers[self.layer_idx].values
        else:
            kv_seq = k.shape[1]
            k = k.view(batch, kv_seq, -1, core.head_dim).transpose(1, 2)  # (B, Hkv, Skv, D)
            v = v.view(batch, kv_seq, -1, core.head_dim).transpose(1, 2)
            if self._rotary:
                cos, sin = kwargs["position_embeddings"]
                q, k = self._apply_rotary(q, k, cos, sin)
            if cache_layer is not None:
                k, v = cache_layer.update(k, v, self.layer_idx)
                if cross and hasattr(cache, "is_updated"):
                    cache.is_updated[self.layer_idx] = True

        position_bias = None
        if self._position_bias:
            position_bias = kwargs.get("position_bias")
            if position_bias is None:
                position_bias = self._t5_bias(seq, k.shape[2], q, past_seen)
        is_causal = kwargs.get("is_causal")
        causal = bool(self._causal if is_causal is None else is_causal) and mask is None and seq > 1
        if causal and k.shape[2] > seq:
            # Empty static cache at prefill: transformers relies on SDPA's top-left causal mask here.
            k, v = k[:, :, :seq], v[:, :, :seq]
        if position_bias is not None:
            mask = _add_bias(mask, position_bias[..., : k.shape[2]])

        out = core(q, k, v, mask=mask, causal=causal, training=self.training)  # (B, Hq, Sq, D)
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        modules = self._modules  # looked up per call: another swap (e.g. float8 Linear) may replace them
        for name in family.outputs:
            out = modules[name](out)
        return (out, position_bias, None) if self._position_bias else (out, None)

    def _t5_bias(self, seq_q: int, seq_kv: int, q: torch.Tensor, past_seen) -> torch.Tensor:
        """T5's relative position bias ``(1, H, Sq, Skv)``, computed by T5's own code (zeros without a table)."""
        if "relative_attention_bias" not in self._modules:
            return torch.zeros((1, self.core.num_heads, seq_q, seq_kv), device=q.device, dtype=q.dtype)
        return self.original_class.compute_bias(self, seq_q, seq_kv, device=q.device, past_seen_tokens=past_seen)


def _add_bias(mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """Fold an additive bias into a mask, as transformers' ``create_position_bias_mask`` does."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, torch.finfo(bias.dtype).min)
    return bias + mask


def _cache_for(cache, cross: bool, layer_idx):
    """(the cache layer object to update, whether cross-attention K/V can be reused from it)."""
    if cache is None:
        return None, False
    if hasattr(cache, "self_attention_cache"):  # EncoderDecoderCache
        if cross:
            return cache.cross_attention_cache, bool(cache.is_updated.get(layer_idx))
        return cache.self_attention_cache, False
    return cache, False


def _fuse_linears(*linears: nn.Linear) -> nn.Linear:
    """One ``nn.Linear`` whose output is the concatenation of ``linears``' outputs (weights copied)."""
    first = linears[0]
    has_bias = first.bias is not None
    fused = nn.Linear(first.in_features, sum(l.out_features for l in linears), bias=has_bias, device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([l.weight for l in linears]))
        if has_bias:
            fused.bias.copy_(torch.cat([l.bias for l in linears]))
    fused.weight.requires_grad_(first.weight.requires_grad)
    if has_bias:
        fused.bias.requires_grad_(first.bias.requires_grad)
    return fused


def _split_qkv_on_save(module: HFAttention, state_dict: dict, prefix: str, local_metadata) -> None:
    """Emit the original's ``query.weight``/``key.weight``/... instead of ``qkv.weight``."""
    q_width, kv_width = module._widths
    for kind in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}qkv.{kind}", None)
        if fused is not None:
            for name, part in zip(module.family.qkv, fused.split((q_width, kv_width, kv_width))):
                state_dict[f"{prefix}{name}.{kind}"] = part


def _fuse_qkv_on_load(module: HFAttention, state_dict: dict, prefix: str, *args) -> None:
    """Accept the original's separate Q/K/V keys by concatenating them into ``qkv``."""
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{name}.{kind}" for name in module.family.qkv]
        if all(key in state_dict for key in keys):
            state_dict[f"{prefix}qkv.{kind}"] = torch.cat([state_dict.pop(key) for key in keys])


def original_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map ``{parameter name: tensor}`` of an optimized model to the original model's names
    (fused ``qkv`` entries split), e.g. to compare gradients with the original's."""
    result = dict(tensors)
    for prefix, module in model.named_modules():
        if isinstance(module, HFAttention) and module.projection == "fused":
            _split_qkv_on_save(module, result, f"{prefix}." if prefix else "", None)
    return result
