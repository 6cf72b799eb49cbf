"""Translate ``nn.MultiheadAttention`` mask conventions into the ``attnkit.ops`` convention.

The two conventions are opposite for bool masks, so every conversion happens here, once:

====================  ===========================  ======================================
mask                  nn.MultiheadAttention         attnkit.ops.attention
====================  ===========================  ======================================
``attn_mask`` bool    True = may NOT attend        True = may attend
``key_padding_mask``  True = ignore this key        (folded into the mask, True = keep)
float masks           added to the scores          added to the scores (unchanged)
====================  ===========================  ======================================

Results are broadcastable to ``(B, Hq, Sq, Skv)`` and never expanded.

``is_causal`` follows torch's rule too (:func:`causal_rule`): with an ``attn_mask`` it is only a
hint that the mask is causal.
"""

from __future__ import annotations

from typing import Literal

import torch

from attnkit.errors import check_arg, check_type, fail

__all__ = [
    "CausalRule",
    "causal_rule",
    "attn_mask_to_ops",
    "key_padding_to_keep",
    "masked_out_to_additive",
    "combine_masks",
    "append_allowed_keys",
]

CausalRule = Literal["none", "bottom-right", "top-left"]
"""Which causal pattern a call gets: none, the op's (query ``i`` sees key ``j <= i + Skv - Sq``), or
SDPA's (``j <= i``, counted over every key including the ``add_bias_kv``/``add_zero_attn`` ones)."""


def _check_mask_dtype(mask: torch.Tensor, name: str) -> None:
    check_type(mask, torch.Tensor, name)
    check_arg(
        mask.dtype == torch.bool or mask.is_floating_point(),
        name,
        "a bool (True = masked out) or floating (additive) tensor",
        mask,
    )


def causal_rule(
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    *,
    key_padding_mask: torch.Tensor | None,
    need_weights: bool,
    cached: bool,
) -> tuple[torch.Tensor | None, CausalRule]:
    """``nn.MultiheadAttention``'s ``is_causal`` rule -> ``(attn_mask still to apply, causal pattern)``.

    * no ``is_causal``: the mask alone;
    * ``is_causal`` with ``attn_mask``: a hint that the mask is causal. Like torch's
      ``multi_head_attention_forward``, the mask is used as given when ``key_padding_mask`` or
      ``need_weights`` is set (or, attnkit only, with a KV cache); otherwise torch drops it unread
      and runs SDPA's top-left causal mask, and so does this (one result for a correct hint,
      torch's result for a wrong one, and the causal kernel when the shape is square);
    * ``is_causal`` alone: torch raises; attnkit applies its bottom-right causal mask, which is
      what a KV cache needs (new queries are the last ``Sq`` positions).
    """
    if not is_causal:
        return attn_mask, "none"
    if attn_mask is None:
        return None, "bottom-right"
    _check_mask_dtype(attn_mask, "attn_mask")
    if key_padding_mask is None and not need_weights and not cached:
        return None, "top-left"
    return attn_mask, "none"


def attn_mask_to_ops(
    attn_mask: torch.Tensor | None, *, batch: int, num_heads: int, seq_q: int, seq_kv: int
) -> torch.Tensor | None:
    """``attn_mask`` in torch's convention -> a 4-D ops mask.

    Accepts ``(Sq, Skv)``, ``(B*Hq, Sq, Skv)`` (as ``nn.MultiheadAttention``) or a 4-D mask
    broadcastable to ``(B, Hq, Sq, Skv)``. Bool True = may NOT attend; floats are additive.
    """
    if attn_mask is None:
        return None
    _check_mask_dtype(attn_mask, "attn_mask")
    full = (batch, num_heads, seq_q, seq_kv)
    if attn_mask.dim() == 2:
        ok, mask = tuple(attn_mask.shape) == (seq_q, seq_kv), attn_mask[None, None]
    elif attn_mask.dim() == 3:
        ok = tuple(attn_mask.shape) == (batch * num_heads, seq_q, seq_kv)
        mask = attn_mask.view(full) if ok else attn_mask
    else:
        ok = attn_mask.dim() == 4 and all(n in (1, m) for n, m in zip(attn_mask.shape, full))
        mask = attn_mask
    if not ok:  # the message is formatted only on failure: this runs on every call
        fail(
            "attn_mask",
            f"shape (Sq, Skv)={(seq_q, seq_kv)}, (B*num_heads, Sq, Skv)={(batch * num_heads, seq_q, seq_kv)} "
            f"or 4-D broadcastable to {full}",
            attn_mask,
            "Skv counts cached keys and excludes the add_bias_kv/add_zero_attn columns.",
        )
    return ~mask if mask.dtype == torch.bool else mask


def key_padding_to_keep(key_padding_mask: torch.Tensor | None, *, batch: int, seq_kv: int) -> torch.Tensor | None:
    """``key_padding_mask (B, Skv)`` in torch's convention (bool True = ignore, or additive float) -> ops ``(B, Skv)``."""
    if key_padding_mask is None:
        return None
    _check_mask_dtype(key_padding_mask, "key_padding_mask")
    if tuple(key_padding_mask.shape) != (batch, seq_kv):
        fail("key_padding_mask", f"shape (B, Skv)={(batch, seq_kv)}", key_padding_mask)
    return ~key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask


def masked_out_to_additive(masked_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask, True = may NOT attend (torch's convention) -> additive 0 / -inf in ``dtype``, same shape.

    Exactly ``F._canonical_mask``'s conversion, so torch's fused kernel gets the mask torch would give it.
    """
    return torch.zeros_like(masked_out, dtype=dtype).masked_fill_(masked_out, float("-inf"))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An ops mask (bool True = attend, or additive) as an additive mask in ``dtype``."""
    return masked_out_to_additive(~mask, dtype) if mask.dtype == torch.bool else mask.to(dtype)


def combine_masks(a: torch.Tensor | None, b: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Both ops masks at once: AND when both are bool, else their sum as additive masks in ``dtype``."""
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    return _additive(a, dtype) + _additive(b, dtype)


def append_allowed_keys(mask: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """Extend an ops mask by ``count`` key columns that every query may attend (``add_bias_kv``/``add_zero_attn``)."""
    if mask is None or count == 0:
        return mask
    allowed = True if mask.dtype == torch.bool else 0.0
    return torch.nn.functional.pad(mask, (0, count), value=allowed)
