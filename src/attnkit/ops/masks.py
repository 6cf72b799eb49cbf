"""Mask helpers shared by the backends: bottom-right causal masks and the merged mask.

Conventions (see docs/architecture.md): a bool mask is True where a query may attend;
a floating mask is added to the scaled scores; ``causal`` is bottom-right aligned unless the call
gives positions (``AttentionOptions.causal_offset``)::

    Sq=2, Skv=5, causal        query i sees key j iff j <= i + (Skv - Sq)
        k: 0 1 2 3 4
    q0:    x x x x .
    q1:    x x x x x

A FlexAttention ``BlockMask`` becomes a dense bool mask for the backends that need one
(:func:`tensor_mask`). Whole-call masks (:func:`call_mask`) are built once per mask object
(``ops/cache.py``), not once per layer and call.
"""

from __future__ import annotations

import functools

import torch

from attnkit.ops.cache import on_clear, per_mask
from attnkit.ops.options import AttentionOptions

__all__ = ["causal_mask", "merged_mask", "empty_rows", "permits_everything", "tensor_mask", "call_mask"]


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
    offset: int | None = None,
) -> torch.Tensor | None:
    """One mask encoding both ``mask`` and ``causal`` for keys ``kv_start:kv_end``, or None if neither is given.

    Bool stays bool (AND); an additive mask stays additive in ``dtype`` with ``-inf`` where
    causality forbids. Broadcast shapes are kept (no expansion to ``(B, H, Sq, Skv)``).
    ``offset``: the causal offset of the whole ``(Sq, Skv)`` problem (None = bottom-right, ``Skv - Sq``).
    """
    kv_end = seq_kv if kv_end is None else kv_end
    offset = seq_kv - seq_q if offset is None else offset
    mask = tensor_mask(mask)
    if mask is not None:
        if mask.shape[-1] != 1:  # a size-1 key dimension broadcasts over every window
            mask = mask[..., kv_start:kv_end]
        if mask.dtype != torch.bool:
            mask = mask.to(dtype)
    if not causal:
        return mask
    allowed = _causal(seq_q, kv_end - kv_start, offset - kv_start, torch.device(device))
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


def permits_everything(mask: torch.Tensor) -> bool:
    """Whether a tensor mask leaves every score unchanged (bool all True, additive all 0): dropping it
    is exact. One pass over the mask and one device sync; callers cache the verdict per mask object."""
    return bool(mask.all() if mask.dtype == torch.bool else (mask == 0).all())


@functools.lru_cache(maxsize=64)
def _causal(seq_q: int, seq_kv: int, offset: int, device: torch.device) -> torch.Tensor:
    return causal_mask(seq_q, seq_kv, device=device, offset=offset)


on_clear(_causal.cache_clear)


def tensor_mask(mask):
    """``mask`` as a tensor: a FlexAttention ``BlockMask`` becomes its dense bool ``(B|1, H|1, Sq, Skv)`` (cached)."""
    if mask is None or isinstance(mask, torch.Tensor):
        return mask
    return per_mask(mask, "dense", lambda: _dense(mask))


def _dense(block_mask) -> torch.Tensor:
    """Exact dense form: the allowed blocks, refined inside them by the mask's ``mask_mod``."""
    from torch.nn.attention.flex_attention import create_mask

    batch, heads, seq_q, seq_kv = block_mask.shape
    rows, cols = block_mask.BLOCK_SIZE
    blocks = block_mask.to_dense().bool()  # (B|1, H|1, Sq / rows, Skv / cols), rounded up
    allowed = blocks.repeat_interleave(rows, dim=-2).repeat_interleave(cols, dim=-1)[..., :seq_q, :seq_kv]
    if block_mask.mask_mod is not None:
        allowed = allowed & create_mask(block_mask.mask_mod, batch, heads, seq_q, seq_kv, device=blocks.device)
    return allowed


def call_mask(options: AttentionOptions, seq_q: int, seq_kv: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """``merged_mask`` of a whole call (mask AND causal at the call's offset), built once per mask object."""
    if not options.causal and (options.mask is None or isinstance(options.mask, torch.Tensor)):
        return options.mask if options.mask is None or options.mask.dtype == torch.bool else options.mask.to(dtype)
    offset = options.causal_offset(seq_q, seq_kv) if options.causal else 0

    def build():
        return merged_mask(options.mask, options.causal, seq_q, seq_kv, dtype=dtype, device=device, offset=offset)

    if options.mask is None:
        return build()  # _causal's own cache
    return per_mask(options.mask, ("merged", options.causal, offset, seq_q, seq_kv, dtype, device), build)
