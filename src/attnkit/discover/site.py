"""`SiteRecord`: the one description of an attention site that analyze, optimize and validate share.

Each command finds attention its own way (a captured graph, transformers' attention interface, runtime SDPA
interception) and keeps its own extras in its own record, which holds or yields a :class:`SiteRecord`:
``AttentionSite.record`` (analyze), ``AttentionCall.site(path)`` (validate), ``InterfaceCall.site`` (optimize).
A multi-head attention module's call (``nn.MultiheadAttention`` or ``attnkit.nn.MultiHeadAttention``, seen by a
forward pre-hook in validate and optimize) is described by :meth:`SiteRecord.of_module_call`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from attnkit.nn.masks import causal_rule
from attnkit.ops import AttentionSpec
from attnkit.ops.options import mask_kind

__all__ = ["SiteRecord", "SiteKind", "SiteMask"]

SiteKind = Literal["self", "cross", "unknown"]
SiteMask = Literal["none", "causal", "padding", "additive", "bool", "block"]

_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")
"""Positional order of ``forward`` in ``nn.MultiheadAttention`` and ``attnkit.nn.MultiHeadAttention``."""

_SPEC_MASKS = {"none": "none", "causal": "none", "padding": "bool", "bool": "bool", "additive": "additive", "block": "block"}
"""Site mask kind -> ``AttentionSpec.mask``: a causal pattern is the ``causal`` flag, padding a bool mask."""


@dataclass(frozen=True)
class SiteRecord:
    """One attention: where it is, its heads and sizes, and how it masks (no tensors, no graph nodes).

    Shapes: ``q (batch, num_heads, seq_q, head_dim_qk)``, ``k (batch, num_kv_heads, seq_kv, head_dim_qk)``,
    ``v (batch, num_kv_heads, seq_kv, head_dim_v)``.
    """

    path: str
    """Module path (fqn) of the attention; ``""`` for the root, or when the finder does not know it."""
    kind: SiteKind
    """``"cross"`` when K/V come from a different tensor than Q; ``"unknown"`` when only the call was seen."""
    num_heads: int
    num_kv_heads: int
    """Fewer than ``num_heads`` for GQA/MQA."""
    head_dim_qk: int
    head_dim_v: int
    batch: int
    seq_q: int
    seq_kv: int
    mask: SiteMask
    """``"none"``/``"bool"``/``"additive"``/``"block"`` as passed; a graph also tells ``"causal"`` (exactly the
    causal pattern) and ``"padding"`` (built from a model input)."""
    causal: bool
    """Bottom-right aligned (attnkit's convention), by flag or read from the mask."""
    scale: float | None
    """Factor on ``QK^T``; None = the default ``1/sqrt(head_dim_qk)`` (the call passed none)."""
    dropout_p: float
    """Dropout on the probabilities (0.0 in eval mode)."""
    qkv_layout: str = "unknown"
    """How Q, K and V are projected (``"packed"``, ``"separate"``, ...; see ``AttentionSite.qkv_layout``)."""
    projections: tuple[tuple[str, str | None], ...] = ()
    """``(("q", gemm), ("k", ...), ("v", ...), ("out", ...))`` where a graph shows them; empty otherwise."""

    @classmethod
    def of_call(cls, path: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask=None, causal: bool = False,
                scale: float | None = None, dropout_p: float = 0.0, kind: SiteKind = "unknown") -> SiteRecord:
        """The site of one attention call on ``q (B, Hq, Sq, D)``, ``k (B, Hkv, Skv, D)``, ``v (B, Hkv, Skv, Dv)``."""
        batch, num_heads, seq_q, head_dim_qk = q.shape
        return cls(path=path, kind=kind, num_heads=num_heads, num_kv_heads=k.shape[1], head_dim_qk=head_dim_qk,
                   head_dim_v=v.shape[-1], batch=batch, seq_q=seq_q, seq_kv=k.shape[2], mask=mask_kind(mask),
                   causal=bool(causal), scale=None if scale is None else float(scale), dropout_p=float(dropout_p))

    @classmethod
    def of_module_call(cls, path: str, module: nn.Module, args: tuple, kwargs: dict) -> SiteRecord:
        """The site of one call of a multi-head attention module, from a forward pre-hook's ``(args, kwargs)``.

        ``module`` is an ``nn.MultiheadAttention`` or an ``attnkit.nn.MultiHeadAttention`` (same forward
        signature; its ``num_kv_heads``, ``v_head_dim``, ``scale`` and KV cache are read too). Inputs are
        ``(B, S, E)`` with ``batch_first``, else ``(S, B, E)``, or unbatched ``(S, E)``. ``is_causal`` follows
        torch's rule (:func:`attnkit.nn.masks.causal_rule`); ``seq_kv`` counts cached keys and the
        ``add_bias_kv``/``add_zero_attn`` ones, as the attention sees them.
        """
        call = {**dict(zip(_MHA_ARGS, args)), **kwargs}
        query = call["query"]
        key = query if call.get("key") is None else call["key"]
        value = key if call.get("value") is None else call["value"]
        kind: SiteKind = "self" if query is key and key is value else "cross"
        batched = query.dim() == 3
        batch_dim, seq_dim = (0, 1) if module.batch_first or not batched else (1, 0)
        cache = call.get("kv_cache")
        extra = (module.bias_k is not None) + bool(module.add_zero_attn) + (0 if cache is None else cache.seq_len)
        seq_q, seq_kv = query.shape[seq_dim], key.shape[seq_dim] + extra
        attn_mask, rule = causal_rule(call.get("attn_mask"), bool(call.get("is_causal", False)), key_padding_mask=call.get("key_padding_mask"),
                                      need_weights=call.get("need_weights", True), cached=cache is not None)  # fmt: skip
        mask_dtypes = [m.dtype for m in (attn_mask, call.get("key_padding_mask")) if m is not None]
        causal = rule == "bottom-right" or (rule == "top-left" and seq_q == seq_kv)
        if rule == "top-left" and not causal:
            mask_dtypes.append(torch.bool)  # SDPA's top-left causal pattern, as a bool mask
        mask: SiteMask = "none" if not mask_dtypes else "bool" if all(d == torch.bool for d in mask_dtypes) else "additive"
        packed = module.in_proj_weight is not None
        if packed and kind == "self":
            layout = "packed"  # one GEMM on the one input
        elif packed and key is value and isinstance(module, nn.MultiheadAttention):
            layout = "kv-packed"  # torch's in-projection: Q, then K and V in one GEMM
        else:
            layout = "separate" if kind == "self" else "separate-kv"
        num_heads = module.num_heads
        return cls(path=path, kind=kind, num_heads=num_heads, num_kv_heads=getattr(module, "num_kv_heads", num_heads),
                   head_dim_qk=module.head_dim, head_dim_v=getattr(module, "v_head_dim", module.head_dim),
                   batch=query.shape[batch_dim] if batched else 1, seq_q=seq_q, seq_kv=seq_kv, mask=mask, causal=causal,
                   scale=getattr(getattr(module, "config", None), "scale", None),
                   dropout_p=float(module.dropout) if module.training else 0.0, qkv_layout=layout)  # fmt: skip

    @property
    def explicit_scale(self) -> float | None:
        """``scale``, or None when it is the default ``1/sqrt(head_dim_qk)`` (so equal sites compare equal)."""
        scale = self.scale
        return None if scale is None or math.isclose(scale * math.sqrt(self.head_dim_qk), 1.0, rel_tol=1e-6) else float(scale)

    def spec(self, *, device: str, dtype: torch.dtype) -> AttentionSpec:
        """The :class:`AttentionSpec` of this site's call on ``device`` (a type such as ``"cuda"``) in ``dtype``."""
        return AttentionSpec(
            batch=self.batch, heads_q=self.num_heads, heads_kv=self.num_kv_heads, seq_q=self.seq_q, seq_kv=self.seq_kv,
            head_dim=self.head_dim_qk, head_dim_v=self.head_dim_v, device=device, dtype=dtype,
            mask=_SPEC_MASKS[self.mask], causal=self.causal, dropout_p=self.dropout_p)

    def describe(self, dtype: torch.dtype | None = None) -> str:
        """``B= Hq= Hkv= Sq= Skv= D= [dtype] mask= causal=``: one line for tables."""
        dtype_text = "" if dtype is None else f"{str(dtype).removeprefix('torch.')} "
        return (f"B={self.batch} Hq={self.num_heads} Hkv={self.num_kv_heads} Sq={self.seq_q} Skv={self.seq_kv} "
                f"D={self.head_dim_qk} {dtype_text}mask={self.mask} causal={self.causal}")
