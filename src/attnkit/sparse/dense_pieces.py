"""Equal packed documents as one batched dense kernel call, exact.

FlexAttention runs any BlockMask but at 0.69-0.72x of cuDNN's dense speed on an H200 (its dense
causal mask at 32k and 128k tokens). ``Documents`` of one length ``L`` (causal or not) are ``n``
dense squares on the diagonal, so here they run on the dense kernels themselves (``ops.kernels``:
cuDNN, flash, efficient on CUDA; the exact plain path elsewhere): the sequence cut into documents
becomes more heads, ``(B, H, n*L, D) -> (B, H*n, L, D)`` (a view of a contiguous tensor), and one
dense call computes everything, with nothing to merge. GQA repeats k and v to the query heads first
(a head ``h*n + c`` of the reshaped q has no KV head the kernels' native GQA can map to).

Measured on an H200 (``benchmarks/sparse/run.py``, B1 H16 D128 bf16; % of ideal, ideal = cuDNN
dense causal ms x block density / causal block density;
``benchmarks/results/sparse/sparse-nvidia-h200-2026-11-27-run2-dense-pieces.json``), 16 packed documents, fwd / fwd+bwd:
dense pieces 96.2% / 87.5% at 32k and 115% / 97.7% at 128k, FlexAttention 43% / 52% and 66% / 69%.

Causal sliding windows stay on FlexAttention. Run as pieces (each chunk of ``W`` tokens: its own
chunk causal, plus the previous chunk reversed into a causal square, merged through the
log-sum-exp), ``SlidingWindow(2048)`` in the same run, dense pieces vs Flex, ms: 8k fwd 0.632 vs
0.415, fwd+bwd 2.58 vs 1.345 (much slower); 32k 1.731 vs 1.678 / 5.535 vs 5.671; 128k 6.917 vs
6.701 / 22.966 vs 23.197 (within 3%, either way). The extra passes (three reversed copies, the
merge, the gradient sums) cost what the dense kernel gains, so that code was removed.

Example::

    out, lse = dense_pieces_attention(q, k, v, Documents((4096,) * 8), return_lse=True)
"""

from __future__ import annotations

import torch

from attnkit.errors import UnsupportedError, check_arg, check_type
from attnkit.ops.sdpa import _WithLse
from attnkit.sparse.documents import Documents
from attnkit.sparse.patterns import SlidingWindow

__all__ = ["dense_pieces_attention", "dense_pieces_support"]


def dense_pieces_support(pattern, q: torch.Tensor, k: torch.Tensor) -> str | None:
    """None if :func:`dense_pieces_attention` runs ``pattern`` on these tensors, else why not."""
    if isinstance(pattern, SlidingWindow):
        return ("sliding windows run on FlexAttention (as dense pieces they were no faster on an H200; "
                "see attnkit/sparse/dense_pieces.py)")  # fmt: skip
    if not isinstance(pattern, Documents):
        return f"dense pieces run Documents of one length only, got {pattern!r}"
    if sum(pattern.lengths) != k.shape[2]:
        return f"the document lengths sum to {sum(pattern.lengths)}, not the key length {k.shape[2]}"
    if len(set(pattern.lengths)) != 1:
        return "dense pieces run documents of one length (unequal documents run on FlexAttention)"
    if q.shape[2] != k.shape[2]:
        return f"dense pieces need Sq == Skv, got Sq={q.shape[2]}, Skv={k.shape[2]}"
    return None


def dense_pieces_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, *, scale: float | None = None, return_lse: bool = False):
    """Exact attention under ``Documents`` of one length, as one dense kernel call over ``H * n`` heads.

    Args:
        q: ``(B, Hq, S, D)``; k: ``(B, Hkv, S, D)`` with ``Hq % Hkv == 0`` (GQA); v: ``(B, Hkv, S, Dv)``.
        pattern: ``Documents`` whose ``n`` lengths are all equal and sum to ``S`` (causal or not).
        scale: multiplies ``q k^T``; default ``1/sqrt(D)``.
        return_lse: also return the log-sum-exp ``(B, Hq, S)``, float32 (float64 for float64 inputs).

    Returns:
        ``out (B, Hq, S, Dv)`` in q's dtype (and ``lse``); differentiable in q, k, v (and through lse).

    Raises:
        UnsupportedError: a sliding window or another pattern, unequal documents or ``Sq != Skv``
            (the message says why; ``sparse_attention`` runs those on FlexAttention).

    Example::

        out = dense_pieces_attention(q, k, v, Documents((4096,) * 8))   # == sparse_attention(q, k, v, Documents((4096,) * 8))
    """
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_type(tensor, torch.Tensor, name)
        check_arg(tensor.dim() == 4, name, "a 4-D tensor (B, H, S, D)", tensor)
    check_arg(q.shape[1] % k.shape[1] == 0 and k.shape[:3] == v.shape[:3], "k, v shapes",
              f"(B, Hkv, S, *) with Hkv dividing Hq={q.shape[1]}", (tuple(k.shape), tuple(v.shape)))  # fmt: skip
    reason = dense_pieces_support(pattern, q, k)
    if reason is not None:
        raise UnsupportedError(f"dense_pieces_attention: {reason}. Use sparse_attention(q, k, v, pattern), which runs any pattern.")
    length, group = pattern.lengths[0], q.shape[1] // k.shape[1]
    if group > 1:  # heads become (head, document) pairs, which the kernels' native GQA cannot map
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    squares = lambda x: x.reshape(x.shape[0], -1, length, x.shape[3])  # noqa: E731  (B, H, n*L, D) -> (B, H*n, L, D)
    out, lse = _WithLse.apply(squares(q), squares(k), squares(v), pattern.causal, scale, None)
    out, lse = out.reshape(*q.shape[:3], v.shape[3]), lse.reshape(q.shape[:3])
    return (out, lse) if return_lse else out
