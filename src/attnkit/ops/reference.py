"""The explicit formula ``softmax(q k^T * scale + mask) v``: the `reference` and `math` backends.

`reference` runs it in float64 (the ground truth); `math` runs it in the input dtype, the
same algorithm as PyTorch's SDPA math kernel, written out so that it can take a
``dropout_mask``, return the log-sum-exp and give zeros for rows with no allowed key.
Both materialize the ``(B, Hq, Sq, Skv)`` scores and run on every device. ``explicit_weights``
is the formula up to the probabilities, shared with ``attention_weights()``.
"""

from __future__ import annotations

import torch

from attnkit.ops.masks import call_mask
from attnkit.ops.options import AttentionOptions

__all__ = ["explicit_attention", "explicit_weights", "reference_attention"]


def explicit_weights(q: torch.Tensor, k: torch.Tensor, options: AttentionOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention probabilities in q's dtype, after masking and dropout (the public form is
    ``attention_weights``); returns ``(weights (B, Hq, Sq, Skv), lse (B, Hq, Sq) | None)``.
    ``options.scale`` must be resolved."""
    if (group := q.shape[1] // k.shape[1]) > 1:
        k = k.repeat_interleave(group, dim=1)  # (B, Hq, Skv, D)
    scores = (q @ k.transpose(-2, -1)) * options.scale  # (B, Hq, Sq, Skv)
    merged = call_mask(options, q.shape[2], k.shape[2], dtype=scores.dtype, device=q.device)
    if merged is not None:
        scores = scores.masked_fill(~merged, float("-inf")) if merged.dtype == torch.bool else scores + merged
    lse = None
    if options.return_lse:
        lse = torch.logsumexp(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).float()
    if merged is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        # Softmax of an all -inf row is NaN (and so is its gradient): give those rows any
        # finite scores, then zero their probabilities.
        empty = (scores == float("-inf")).all(dim=-1, keepdim=True)  # (B, Hq, Sq, 1)
        probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if options.dropout_p > 0:
        keep = options.dropout_mask if options.dropout_mask is not None else torch.rand_like(probs) >= options.dropout_p
        probs = probs.masked_fill(~keep, 0.0) * (1.0 / (1.0 - options.dropout_p))
    return probs, lse


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: AttentionOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention in q's dtype. Shapes as in ``attention()``; returns ``(out (B, Hq, Sq, Dv), lse (B, Hq, Sq) | None)``."""
    probs, lse = explicit_weights(q, k, options)
    if (group := q.shape[1] // v.shape[1]) > 1:
        v = v.repeat_interleave(group, dim=1)  # (B, Hq, Skv, Dv)
    return probs @ v, lse


def reference_attention(q, k, v, options: AttentionOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``explicit_attention`` in float64; the output is cast back to q's dtype."""
    out, lse = explicit_attention(q.double(), k.double(), v.double(), options)
    return out.to(q.dtype), lse
