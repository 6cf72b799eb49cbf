"""Merging partial attention results through their log-sum-exp, in float32.

Attention over the union of two disjoint key sets A and B is a convex combination of the
attention over each: with ``lse`` the natural-log log-sum-exp of a row's scaled, masked scores,

    out = w_a * out_a + w_b * out_b,   w_x = exp(lse_x - lse),   lse = log(exp(lse_a) + exp(lse_b)).

Ring attention (one key block per hop) and sparse attention (one partial per selected block set)
combine partials with :func:`merge_partials`; the chunked backend runs the same merge with each lse
kept as a row max and a sum of ``exp(score - max)``, so that no rounded lse enters its weights.
The merge runs in float32 (float64 when any input is float64), so a long chain of merges never rounds
to bf16 between steps; cast once at the end.
"""

from __future__ import annotations

import torch

__all__ = ["merge_partials"]


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attention results over disjoint key sets into the result over their union.

    Args:
        out_a, out_b: partial outputs ``(..., S, Dv)``, any floating dtype; a row whose keys were
            all masked must hold zeros (what every ``attnkit.ops`` backend returns).
        lse_a, lse_b: their log-sum-exps ``(..., S)``; ``-inf`` for a row with no allowed key.

    Returns:
        ``(out (..., S, Dv), lse (..., S))`` in ``promote_types(dtype, float32)`` over the four inputs (float64 if any is float64). A row empty in both stays zeros with
        ``lse = -inf``; gradients through the merge are finite there (zero).

    Example::

        out_1, lse_1 = attention(q, k[..., :n, :], v[..., :n, :], return_lse=True)
        out_2, lse_2 = attention(q, k[..., n:, :], v[..., n:, :], return_lse=True)
        out, lse = merge_partials(out_1, lse_1, out_2, lse_2)   # == attention(q, k, v)
    """
    acc = torch.float32
    for x in (out_a, lse_a, out_b, lse_b):  # float64 anywhere -> float64: exact chains stay exact
        acc = torch.promote_types(acc, x.dtype)
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    peak = torch.maximum(lse_a, lse_b)
    # Subtract the larger lse so both weights are <= 1 (no overflow); a row empty in both halves
    # has peak = -inf, replaced by 0 so the weights come out exp(-inf) = 0 instead of NaN.
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weight_a = torch.exp(lse_a - peak)
    weight_b = torch.exp(lse_b - peak)
    total = weight_a + weight_b
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    lse = torch.where(nonempty, peak + torch.log(safe_total), torch.full_like(total, float("-inf")))
    out = out_a.to(acc) * (weight_a / safe_total).unsqueeze(-1) + out_b.to(acc) * (weight_b / safe_total).unsqueeze(-1)
    return out, lse
