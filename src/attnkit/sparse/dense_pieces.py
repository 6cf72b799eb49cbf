"""Causal sliding windows and equal packed documents as a few batched dense kernel calls, exact.

FlexAttention runs any BlockMask but at 0.68-0.73x of cuDNN's dense speed on an H200
(benchmarks/results/sparse/sparse-nvidia-h200-2026-11-27.json). These two patterns are unions of
dense squares, so here they run on the dense kernels themselves (``ops.kernels``: cuDNN, flash,
efficient on CUDA; the exact plain path elsewhere), batched over the squares:

* ``Documents`` of one length ``L`` (causal or not): the sequence cut into documents becomes more
  heads, ``(B, H, S, D) -> (B, H*n, L, D)`` (a view of a contiguous tensor), and one dense call
  computes everything; nothing to merge.
* ``SlidingWindow(W, causal=True)`` (query ``p`` sees ``j`` iff ``0 <= p - j < W``): cut into
  chunks of ``C = W`` tokens. Query ``i`` of chunk ``c`` sees (a) keys ``j <= i`` of its own chunk,
  one batched causal call over all chunks, and (b) keys ``j > i`` of chunk ``c - 1`` (distance
  ``C + i - j < C``), a strict upper triangle. Reversing both, query ``r = C-2-i`` (``i <= C-2``)
  and key ``s = C-1-j`` (``j >= 1``), turns ``i < j`` into ``s <= r``: a square ``C-1`` causal
  call, batched over chunk pairs (row ``C-1`` sees nothing there)::

        chunk c-1 | chunk c              (b), reversed:  s = C-1-j
      i  . x x x  | x . . .                              r  x . .
         . . x x  | x x . .      ->      r = C-2-i         x x .
         . . . x  | x x x .                                x x x
         . . . .  | x x x x   (a): own chunk, causal

  The two partials merge through their log-sum-exp (``ops.lse.merge_partials``, float32); the
  backward of each uses the rows' final ``out`` and ``lse`` (as ring attention does) and the
  gradients add up. ``S`` not a multiple of ``C`` is zero-padded at the end (padded keys come
  after every real query, so causality hides them).

Cost beyond the kernels: (b) reads q, k, v in reversed row order (three gathered copies) and the
merge reads both partials; backward gathers grad_out and out once more and adds the gradients of
both pieces. On CUDA the merge and the gradient sums are compiled (one fused pass each). GQA
repeats k and v to the query heads first (cuDNN's kernel does the same).

Example::

    out = dense_pieces_attention(q, k, v, SlidingWindow(2048))
    out, lse = dense_pieces_attention(q, k, v, Documents((4096,) * 8), return_lse=True)
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from attnkit.errors import UnsupportedError, check_arg, check_type
from attnkit.ops.kernels import backward_from_lse, forward_with_lse
from attnkit.ops.lse import merge_partials
from attnkit.sparse.documents import Documents
from attnkit.sparse.patterns import SlidingWindow

__all__ = ["dense_pieces_attention", "dense_pieces_support", "chunk_length"]

_NEG_INF = float("-inf")


def chunk_length(pattern, seq_len: int) -> int | None:
    """Tokens per dense square for ``pattern`` over ``seq_len`` tokens (the window, capped at ``seq_len``;
    the document length), or None when the pattern is not one these pieces run."""
    if isinstance(pattern, SlidingWindow) and pattern.causal:
        return min(pattern.window, seq_len)
    if isinstance(pattern, Documents) and len(set(pattern.lengths)) == 1 and sum(pattern.lengths) == seq_len:
        return pattern.lengths[0]
    return None


def dense_pieces_support(pattern, q: torch.Tensor, k: torch.Tensor) -> str | None:
    """None if :func:`dense_pieces_attention` runs ``pattern`` on these tensors, else why not."""
    if isinstance(pattern, SlidingWindow) and not pattern.causal:
        return "dense pieces run causal sliding windows only (SlidingWindow(W, causal=True))"
    if isinstance(pattern, Documents):
        if sum(pattern.lengths) != k.shape[2]:
            return f"the document lengths sum to {sum(pattern.lengths)}, not the key length {k.shape[2]}"
        if len(set(pattern.lengths)) != 1:
            return "dense pieces run documents of one length (unequal documents run on FlexAttention)"
    elif not isinstance(pattern, SlidingWindow):
        return f"dense pieces run SlidingWindow(W, causal=True) and Documents of one length, got {pattern!r}"
    if q.shape[2] != k.shape[2]:
        return f"dense pieces need Sq == Skv, got Sq={q.shape[2]}, Skv={k.shape[2]}"
    return None


class _Plan(NamedTuple):
    """How the padded sequence of ``chunks * chunk`` tokens is cut (plain ints: compiled helpers guard on them)."""

    chunk: int
    """C: tokens per square (window or document length)."""
    chunks: int
    """n: squares along the sequence."""
    causal: bool
    """Within each square (piece a)."""
    windowed: bool
    """Also piece (b): the previous chunk, reversed (a window over more than one chunk of > 1 token)."""


# ---------------------------------------------------------------- layouts of the two pieces


def _squares(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Piece (a): ``(B, H, n*C, ...) -> (B, H*n, C, ...)``, a view of a contiguous tensor."""
    return x.reshape(x.shape[0], -1, plan.chunk, *x.shape[3:])


def _from_squares(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Inverse of :func:`_squares`: ``(B, H*n, C, ...) -> (B, H, n*C, ...)``."""
    return x.reshape(x.shape[0], -1, plan.chunks * plan.chunk, *x.shape[3:])


def _reversed_rows(plan: _Plan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows gathered for piece (b), chunk pair by chunk pair: queries ``c*C + C-2-r`` of chunks
    ``c = 1..n-1`` and keys ``m*C + C-1-s`` of chunks ``m = 0..n-2``, for ``r, s = 0..C-2``."""
    chunk = plan.chunk
    starts = torch.arange(plan.chunks - 1, device=device)[:, None] * chunk
    back = torch.arange(chunk - 1, device=device)[None, :]
    return (starts + chunk + chunk - 2 - back).flatten(), (starts + chunk - 1 - back).flatten()


def _gather(x: torch.Tensor, rows: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Piece (b) layout: ``(B, H, n*C, ...) -> (B, H*(n-1), C-1, ...)`` in reversed row order."""
    return x.index_select(2, rows).reshape(x.shape[0], -1, plan.chunk - 1, *x.shape[3:])


def _pad_dims(x: torch.Tensor, pads: dict[int, tuple[int, int]], value: float) -> torch.Tensor:
    """``F.pad`` of the dims in ``pads`` (``dim: (before, after)``), counted from the front."""
    spec: list[int] = []
    for dim in range(x.dim() - 1, min(pads) - 1, -1):
        spec.extend(pads.get(dim, (0, 0)))
    return F.pad(x, spec, value=value)


def _reversed_to_queries(x: torch.Tensor, plan: _Plan, fill: float) -> torch.Tensor:
    """Piece (b) query rows back to ``(B, H, n*C, ...)``; rows it has none for (chunk 0, row C-1) get ``fill``."""
    x = x.reshape(x.shape[0], -1, plan.chunks - 1, plan.chunk - 1, *x.shape[3:]).flip(3)  # rows i = 0..C-2
    return _pad_dims(x, {2: (1, 0), 3: (0, 1)}, fill).flatten(2, 3)


def _reversed_to_keys(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Piece (b) key rows back to ``(B, H, n*C, ...)`` (zeros for chunk n-1 and row 0 of every chunk)."""
    x = x.reshape(x.shape[0], -1, plan.chunks - 1, plan.chunk - 1, *x.shape[3:]).flip(3)  # rows j = 1..C-1
    return _pad_dims(x, {2: (0, 1), 3: (1, 0)}, 0.0).flatten(2, 3)


# ---------------------------------------------------------------- combining pieces (fused on CUDA)


def _merge(out_a, lse_a, out_b, lse_b, plan: _Plan, dtype: torch.dtype):
    """``(out (B, H, n*C, Dv) in dtype, lse (B, H, n*C))`` of pieces (a) and (b) in their layouts."""
    out, lse = merge_partials(
        _from_squares(out_a, plan), _from_squares(lse_a, plan), _reversed_to_queries(out_b, plan, 0.0), _reversed_to_queries(lse_b, plan, _NEG_INF)
    )
    return out.to(dtype), lse


def _add_grads(grads_a, grads_b, plan: _Plan, dtypes: tuple[torch.dtype, ...]):
    """``(dq, dk, dv)`` in ``(B, H, n*C, ...)``: piece (a)'s plus piece (b)'s put back in place."""
    (dq_a, dk_a, dv_a), (dq_b, dk_b, dv_b) = grads_a, grads_b
    acc = torch.promote_types(dq_a.dtype, torch.float32)
    dq = _from_squares(dq_a, plan).to(acc) + _reversed_to_queries(dq_b, plan, 0.0).to(acc)
    dk = _from_squares(dk_a, plan).to(acc) + _reversed_to_keys(dk_b, plan).to(acc)
    dv = _from_squares(dv_a, plan).to(acc) + _reversed_to_keys(dv_b, plan).to(acc)
    return tuple(grad.to(dtype) for grad, dtype in zip((dq, dk, dv), dtypes))


@functools.cache  # not cleared by clear_caches(): recompiling gains nothing
def _compiled(fn):
    # Static shapes (one compile per shape, like ops/flex.py); Inductor turns the flips, pads and the
    # merge into one pass over the partials instead of a dozen full-size float32 temporaries.
    return torch.compile(fn, dynamic=False)


def _fused(fn, x: torch.Tensor):
    return _compiled(fn) if x.device.type == "cuda" and not torch.compiler.is_compiling() else fn


# ---------------------------------------------------------------- forward, backward, autograd


def _forward(q, k, v, plan: _Plan, scale: float, rows):
    """``out (B, H, n*C, Dv)`` in q's dtype, ``lse (B, H, n*C)`` and piece (b)'s gathered inputs (or None)."""
    out_a, lse_a = forward_with_lse(_squares(q, plan), _squares(k, plan), _squares(v, plan), causal=plan.causal, scale=scale)
    if not plan.windowed:
        return _from_squares(out_a, plan), _from_squares(lse_a, plan), None
    reversed_inputs = (_gather(q, rows[0], plan), _gather(k, rows[1], plan), _gather(v, rows[1], plan))
    out_b, lse_b = forward_with_lse(*reversed_inputs, causal=True, scale=scale)
    out, lse = _fused(_merge, q)(out_a, lse_a, out_b, lse_b, plan, q.dtype)
    return out, lse, reversed_inputs


def _backward(grad_out, grad_lse, q, k, v, out, lse, plan: _Plan, scale: float, rows, reversed_inputs):
    """``(dq, dk, dv)`` of the padded, head-expanded inputs."""
    lse_or_none = lambda layout: None if grad_lse is None else layout(grad_lse)  # noqa: E731
    square = lambda x: _squares(x, plan)  # noqa: E731
    grads_a = backward_from_lse(
        square(grad_out), square(q), square(k), square(v), square(out), square(lse),
        causal=plan.causal, scale=scale, grad_lse=lse_or_none(square), accumulate=True,
    )  # fmt: skip
    if not plan.windowed:
        return tuple(_from_squares(grad, plan).to(x.dtype) for grad, x in zip(grads_a, (q, k, v)))
    by_query = lambda x: _gather(x, rows[0], plan)  # noqa: E731
    grads_b = backward_from_lse(
        by_query(grad_out), *reversed_inputs, by_query(out), by_query(lse),
        causal=True, scale=scale, grad_lse=lse_or_none(by_query), accumulate=True,
    )  # fmt: skip
    return _fused(_add_grads, q)(grads_a, grads_b, plan, (q.dtype, k.dtype, v.dtype))


class _DensePieces(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        rows = _reversed_rows(plan, q.device) if plan.windowed else None
        out, lse, reversed_inputs = _forward(q, k, v, plan, scale, rows)
        ctx.save_for_backward(q, k, v, out, lse, *(reversed_inputs or ()))
        ctx.options = (plan, scale, rows)
        ctx.set_materialize_grads(False)  # an unused lse costs no backward work
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, *reversed_inputs = ctx.saved_tensors
        plan, scale, rows = ctx.options
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grads = _backward(grad_out, grad_lse, q, k, v, out, lse, plan, scale, rows, reversed_inputs or None)
        return (*grads, None, None)


def _plan(pattern, seq_len: int) -> _Plan:
    chunk = chunk_length(pattern, seq_len)
    chunks = -(-seq_len // chunk)
    if isinstance(pattern, Documents):
        return _Plan(chunk, chunks, pattern.causal, False)
    return _Plan(chunk, chunks, True, chunks > 1 and chunk > 1)


def dense_pieces_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, *, scale: float | None = None, return_lse: bool = False):
    """Exact attention under a causal ``SlidingWindow`` or equal ``Documents`` from batched dense calls.

    Args:
        q: ``(B, Hq, S, D)``; k: ``(B, Hkv, S, D)`` with ``Hq % Hkv == 0`` (GQA); v: ``(B, Hkv, S, Dv)``.
        pattern: ``SlidingWindow(W, causal=True)`` (any ``W >= 1``) or ``Documents`` whose lengths are
            all equal and sum to ``S`` (causal or not).
        scale: multiplies ``q k^T``; default ``1/sqrt(D)``.
        return_lse: also return the log-sum-exp ``(B, Hq, S)``, float32 (float64 for float64 inputs).

    Returns:
        ``out (B, Hq, S, Dv)`` in q's dtype (and ``lse``); differentiable in q, k, v (and through lse).

    Raises:
        UnsupportedError: another pattern, unequal documents or ``Sq != Skv`` (the message says why;
            ``sparse_attention`` runs those on FlexAttention).

    Example::

        out = dense_pieces_attention(q, k, v, SlidingWindow(2048))   # == sparse_attention(q, k, v, SlidingWindow(2048))
    """
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_type(tensor, torch.Tensor, name)
        check_arg(tensor.dim() == 4, name, "a 4-D tensor (B, H, S, D)", tensor)
    check_arg(q.shape[1] % k.shape[1] == 0 and k.shape[:3] == v.shape[:3], "k, v shapes",
              f"(B, Hkv, S, *) with Hkv dividing Hq={q.shape[1]}", (tuple(k.shape), tuple(v.shape)))  # fmt: skip
    reason = dense_pieces_support(pattern, q, k)
    if reason is not None:
        raise UnsupportedError(f"dense_pieces_attention: {reason}. Use sparse_attention(q, k, v, pattern), which runs any pattern.")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seq_len, group = q.shape[2], q.shape[1] // k.shape[1]
    plan = _plan(pattern, seq_len)
    if group > 1:  # heads become (head, chunk) pairs, which the kernels' native GQA cannot map
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    pad = plan.chunks * plan.chunk - seq_len
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    out, lse = _DensePieces.apply(q, k, v, plan, scale)
    if pad:
        out, lse = out[:, :, :seq_len], lse[:, :, :seq_len]
    return (out, lse) if return_lse else out
