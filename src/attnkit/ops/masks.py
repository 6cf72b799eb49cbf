"""Mask helpers shared by the backends: bottom-right causal masks and the merged mask.

Conventions (see docs/architecture.md): a bool mask is True where a query may attend;
a floating mask is added to the scaled scores; ``causal`` is bottom-right aligned::

    Sq=2, Skv=5, causal        query i sees key j iff j <= i + (Skv - Sq)
        k: 0 1 2 3 4
    q0:    x x x x .
    q1:    x x x x x
"""

from __future__ import annotations

import torch

__all__ = ["causal_mask", "merged_mask", "empty_rows"]


def causal_mask(seq_q: int, seq_kv: int, device: torch.device | str | None = None, *, offset: int | None = None) -> torch.Tensor:
    """Bool ``(Sq, Skv)`` causal mask, True where key ``j <= i + offset``.

    ``offset`` defaults to ``Skv - Sq`` (bottom-right). For one tile of a larger problem pass
    ``(Skv_total - Sq_total) + q_start - kv_start``.
    """
    offset = seq_kv - seq_q if offset is None else offset
    rows = torch.arange(seq_q, device=device).unsqueeze(-1)
    return torch.arange(seq_kv, device=device) <= rows + offset


def merged_mask(
    mask: torch.Tensor | None,
    causal: bool,
    seq_q: int,
    seq_kv: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    kv_start: int = 0,
    kv_end: int | None = None,
) -> torch.Tensor | None:
    """One mask encoding both ``mask`` and ``causal`` for keys ``kv_start:kv_end``, or None if neither is given.

    Bool stays bool (AND); an additive mask stays additive in ``dtype`` with ``-inf`` where
    causality forbids. Broadcast shapes are kept (no expansion to ``(B, H, Sq, Skv)``).
    """
    kv_end = seq_kv if kv_end is None else kv_end
    if mask is not None:
        if mask.shape[-1] != 1:  # a size-1 key dimension broadcasts over every window
            mask = mask[..., kv_start:kv_end]
        if mask.dtype != torch.bool:
            mask = mask.to(dtype)
    if not causal:
        return mask
    allowed = causal_mask(seq_q, kv_end - kv_start, device=device, offset=seq_kv - seq_q - kv_start)
    if mask is None or mask.dtype == torch.bool:
        return allowed if mask is None else mask & allowed
    return mask.masked_fill(~allowed, float("-inf"))


def empty_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Bool ``(..., Sq, 1)``: rows of a merged mask with no key allowed, or None if there can be none.

    Kernels disagree on such rows (NaN, zeros, uniform); attnkit returns zeros.
    """
    if mask is None:
        return None
    allowed = mask if mask.dtype == torch.bool else mask != float("-inf")
    return ~allowed.any(dim=-1, keepdim=True)
