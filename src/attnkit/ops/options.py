"""`AttentionOptions`: everything about an attention call except the tensors q, k, v.

One frozen object travels from ``attention()`` through the dispatcher to every backend's ``run``
(``run(q, k, v, options) -> (out, lse | None)``), so a new option (a process group, a layout, a
sparsity pattern) is a new field here, not a new keyword in fourteen signatures.

Causal alignment::

    default (q_start = kv_start = None): bottom-right, query i sees key j iff j <= i + (Skv - Sq)
    positions given:                     query at q_start + i sees key at kv_start + j
                                         iff kv_start + j <= q_start + i

    Sq=2, Skv=4, default:         q_start=4, kv_start=0 (a shard):  q_start=0, kv_start=0:
        k0 k1 k2 k3                   k0 k1 k2 k3                       k0 k1 k2 k3
    q0:  x  x  x  .               q0:  x  x  x  x                   q0:  x  .  .  .
    q1:  x  x  x  x               q1:  x  x  x  x                   q1:  x  x  .  .
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["AttentionOptions", "MASK_KINDS", "mask_kind", "is_block_mask"]

MASK_KINDS = ("none", "bool", "additive", "block")

try:
    from torch.nn.attention.flex_attention import BlockMask as _BlockMask
except ImportError:  # torch < 2.5: no BlockMask; flex_support says so
    _BlockMask = None


def is_block_mask(mask: Any) -> bool:
    """True for a FlexAttention ``BlockMask`` or a pattern object with a ``block_mask(...)`` method."""
    return (_BlockMask is not None and isinstance(mask, _BlockMask)) or callable(getattr(mask, "block_mask", None))


def mask_kind(mask: Any) -> str:
    """One of ``MASK_KINDS`` for an attention mask (not validated here)."""
    if mask is None:
        return "none"
    if isinstance(mask, torch.Tensor):
        return "bool" if mask.dtype == torch.bool else "additive"
    return "block"


@dataclass(frozen=True)
class AttentionOptions:
    """How to compute one attention call; ``attention(q, k, v, options=...)`` or its keywords.

    Checked against the tensors by ``attention_spec`` (``attention()``'s boundary), not here:
    a mask's shape means something only next to q and k.
    """

    mask: Any = None
    """None; a bool tensor (True = may attend) or a floating one (added to the scaled scores),
    broadcastable to ``(B, Hq, Sq, Skv)``; a FlexAttention ``BlockMask`` of shape ``(B or 1, Hq or 1,
    Sq, Skv)``; or a sparsity pattern with ``block_mask(batch, heads, seq_q, seq_kv, device) -> BlockMask``."""
    causal: bool = False
    """Bottom-right aligned unless ``q_start``/``kv_start`` place the rows (see the module docstring)."""
    scale: float | None = None
    """Multiplies ``q k^T``; None = ``1/sqrt(D)``."""
    dropout_p: float = 0.0
    """Dropout on the probabilities; kept ones scaled by ``1/(1-p)``."""
    dropout_mask: torch.Tensor | None = None
    """Bool keep-mask broadcastable to ``(B, Hq, Sq, Skv)``; makes dropout reproducible."""
    return_lse: bool = False
    """Also return the natural-log log-sum-exp ``(B, Hq, Sq)`` float32."""
    q_start: int | None = None
    """Global position of query row 0 (a sequence shard); None with ``kv_start`` None = bottom-right."""
    kv_start: int | None = None
    """Global position of key 0; when only one of the two starts is given the other is 0."""
    pattern: Any = None
    """The sparsity pattern ``mask`` (its BlockMask) was resolved from, if any: a backend that runs
    some patterns another way (``sparse``'s dense pieces) reads it; the rest use ``mask``."""

    def causal_offset(self, seq_q: int, seq_kv: int) -> int:
        """Query ``i`` may see key ``j`` iff ``j <= i + offset`` (when ``causal``)."""
        if self.q_start is None and self.kv_start is None:
            return seq_kv - seq_q
        return (self.q_start or 0) - (self.kv_start or 0)
