"""Ring attention: exact attention over a sequence sharded across ranks, K/V passed around a ring.

Each of ``W`` steps, every rank attends its queries to the K/V block it holds, starts sending that
block to the next rank and receives the previous rank's; after ``W`` steps every query has seen
every key. Partial outputs merge through their log-sum-exp in float32 (``merge_partials`` here: ``ops.lse.merge_partials`` in place)
and are cast once at the end. Backward passes K/V around the ring again, together with float32
dK/dV accumulators that arrive back at their owners after the last step; dQ accumulates in float32.

Which part of a block a step computes (rank ``r`` holding the K/V of rank ``j``)::

    causal=False:        every step: all queries x all keys
    causal, contiguous:  j == r: diagonal (causal);  j < r: all x all;  j > r: nothing
    causal, zigzag:      j == r: diagonal (causal);
                         j < r: all queries x first half of the keys (chunk j, before both query chunks)
                         j > r: second half of the queries (chunk 2W-1-r, after both key chunks) x all keys

so with zigzag every rank computes the same amount at every step after the first. A sliding
window or packed documents split each step into chunk pairs masked on global positions, and pairs
the mask empties are skipped (``parallel.schedule``); packed documents alone run as dense
per-document rectangles (no mask), and when no document crosses from one rank's chunks to
another's the schedule is one step and nothing travels.

Per step (what ring-flash-attention does too): the next K/V block's transfer is started before the
current block's kernel is queued, in forward and backward; backward also passes the dK/dV sums of
the other ranks' shares on, started right after the step's gradients are added and waited for one
step later, so both transfers run while the next block computes. A rank's own share never travels,
and a sum of one share travels in the kernel's dtype (exact), so on 2 ranks the last transfer,
which no compute hides, is bf16. Nothing waits on the host: ``RingComm.wait``
makes the compute stream wait for NCCL's. An unmasked zigzag step is one attention kernel; the
partial result is merged into the float32 accumulators in place (``merge_partials`` below: two
full-size kernels, no full-size temporaries), and the query-side row slices that a step needs dense
(half of q, grad_out, out, lse) are copied once per call, not once per step.

Precision: partial outputs, dq and the travelling dK/dV sums of two or more shares are float32 (float64 for
float64 inputs) and each block's share comes back from the plain (CPU) path in that dtype
(``accumulate=True``), so nothing is rounded to bf16 before the final cast. The CUDA kernels write
each block's out/dq/dk/dv in the input dtype, so on GPU every block's share carries one bf16
rounding before the float32 sum (the one-GPU kernel has the same single rounding per output).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from attnkit.ops.kernels import backward_from_lse, forward_with_lse
from attnkit.parallel.checks import check_masks, check_shards
from attnkit.parallel.comm import RingComm
from attnkit.parallel.layout import unshard_sequence
from attnkit.parallel.schedule import Piece, ring_schedule

__all__ = ["ring_attention"]


def _rows(x: torch.Tensor, rows: slice) -> torch.Tensor:
    """Rows ``rows`` of ``x (B, H, S, ...)``, dense: every kernel takes a dense block (a half-block
    copy costs a fraction of a percent of its attention)."""
    return x[:, :, rows].contiguous()


class _FixedRows:
    """Dense row slices of tensors that stay put for a whole ring pass (q, grad_out, out, lse),
    each copied at most once per call instead of once per step."""

    def __init__(self, **tensors: torch.Tensor | None):
        self._tensors = tensors
        self._dense: dict[tuple, torch.Tensor] = {}

    def __call__(self, name: str, rows: slice) -> torch.Tensor | None:
        tensor = self._tensors[name]
        if tensor is None:
            return None
        key = (name, rows.start, rows.stop, rows.step)  # slices are unhashable before Python 3.12
        if key not in self._dense:
            self._dense[key] = _rows(tensor, rows)
        return self._dense[key]


def merge_partials(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the partial ``(part, part_lse)`` into the accumulators ``(out, lse)`` in place; returns them.

    The result of ``ops.lse.merge_partials(out, lse, part, part_lse)`` (same arguments, same
    numbers to rounding), written into ``out (..., S, Dv)`` and ``lse (..., S)`` (float32, float64
    for float64 inputs; views of the ring's accumulators) with two full-size kernels and no
    full-size temporary::

        new = logaddexp(lse, part_lse);   out = out * exp(lse - new) + part * exp(part_lse - new)

    A row empty in both (``-inf`` twice: masked blocks only) gets weights NaN -> 0 and stays
    zeros with ``lse = -inf``. ``part`` may be bf16: ``addcmul_`` reads it in ``out``'s dtype.
    """
    new = torch.logaddexp(lse, part_lse.to(lse.dtype))
    keep = torch.exp(lse - new).nan_to_num_(nan=0.0).unsqueeze(-1)
    take = torch.exp(part_lse - new).nan_to_num_(nan=0.0).unsqueeze(-1)
    out.mul_(keep).addcmul_(part, take)
    lse.copy_(new)
    return out, lse


def _ring_forward(q, k, v, comm: RingComm, schedule: list[list[Piece]], scale: float):
    """Returns ``out (B, Hq, S_local, Dv)`` and ``lse (B, Hq, S_local)``, float32 (float64 for float64 inputs).
    Runs ``len(schedule)`` steps (1: nothing travels)."""
    steps = len(schedule)
    acc = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    fixed = _FixedRows(q=q)
    for step in range(steps):
        if step + 1 < steps:  # the next block travels while this one computes
            next_k, next_v = comm.send_recv(k), comm.send_recv(v)
            comm.commit()
        for piece in schedule[step]:
            part, part_lse = forward_with_lse(
                fixed("q", piece.rows), _rows(k, piece.keys), _rows(v, piece.keys), causal=piece.causal, scale=scale, mask=piece.mask, accumulate=True
            )
            # In place (views of the accumulators); assigning a view to itself copies nothing.
            out[:, :, piece.rows], lse[:, :, piece.rows] = merge_partials(out[:, :, piece.rows], lse[:, :, piece.rows], part, part_lse)
        if step + 1 < steps:
            comm.wait()  # the compute stream waits for the transfer; the host does not
            k, v = next_k, next_v
    return out, lse


def _step_share(parts, pieces: list[Piece], like: torch.Tensor, index: int, acc: torch.dtype) -> torch.Tensor:
    """This step's gradient for the K (``index=1``) or V (``index=2``) block held, full block size.

    One piece: its gradient placed in a zero block of the kernel's own dtype (bf16 from the CUDA
    kernels: no rounding, so it may travel in bf16); several pieces: summed in ``acc``.
    """
    if len(pieces) == 1:
        grad = parts[0][index]
        if grad.shape == like.shape:
            return grad
        share = torch.zeros(like.shape, dtype=grad.dtype, device=like.device)
        share[:, :, pieces[0].keys] = grad
        return share
    share = torch.zeros(like.shape, dtype=acc, device=like.device)
    for piece, part in zip(pieces, parts):
        share[:, :, piece.keys] += part[index]
    return share


def _ring_backward(grad_out, grad_lse, q, k, v, out, lse, group, schedule: list[list[Piece]], scale: float):
    """Returns ``(dq, dk, dv)`` of the local shards in float32 (float64 for float64 inputs).

    dK/dV: this rank's own block's share (step 0) stays here. The shares other ranks compute for
    a block travel with it, summed in float32 along the way, and reach home after the last step;
    a travelling sum of one share goes in the kernel's dtype (exact: the share is that dtype), so
    on 2 ranks the one transfer that nothing overlaps (the last) carries bf16, half the bytes.
    """
    kv_comm, grad_comm = RingComm(group), RingComm(group)
    steps = len(schedule)  # 1: every block stays home, nothing travels
    acc = torch.promote_types(q.dtype, torch.float32)
    grad_q = torch.zeros(q.shape, dtype=acc, device=q.device)
    fixed = _FixedRows(grad_out=grad_out, q=q, out=out, lse=lse, grad_lse=grad_lse)
    home_k = home_v = travel_k = travel_v = None
    for step in range(steps):
        if step + 1 < steps:  # the next block travels while this one computes
            next_k, next_v = kv_comm.send_recv(k), kv_comm.send_recv(v)
            kv_comm.commit()
        pieces = schedule[step]
        parts = [
            backward_from_lse(
                fixed("grad_out", p.rows), fixed("q", p.rows), _rows(k, p.keys), _rows(v, p.keys), fixed("out", p.rows), fixed("lse", p.rows),
                causal=p.causal, scale=scale, grad_lse=fixed("grad_lse", p.rows), mask=p.mask, accumulate=True,
            )
            for p in pieces
        ]  # fmt: skip
        for piece, (dq, _, _) in zip(pieces, parts):
            grad_q[:, :, piece.rows] += dq
        share_k, share_v = _step_share(parts, pieces, k, 1, acc), _step_share(parts, pieces, v, 2, acc)
        if step == 0:
            home_k, home_v = share_k.to(acc), share_v.to(acc)
        elif step == 1:
            travel_k, travel_v = share_k, share_v
        else:  # the sum of the shares before this rank, sent by the previous rank last step
            grad_comm.wait()
            travel_k, travel_v = next_grad_k.to(acc).add_(share_k), next_grad_v.to(acc).add_(share_v)
        if step >= 1:  # pass it on with the block (it travels during the next step); after the last step it is home
            next_grad_k, next_grad_v = grad_comm.send_recv(travel_k), grad_comm.send_recv(travel_v)
            grad_comm.commit()
        if step + 1 < steps:
            kv_comm.wait()
            k, v = next_k, next_v
    if steps == 1:
        return grad_q, home_k, home_v
    grad_comm.wait()
    return grad_q, home_k.add_(next_grad_k), home_v.add_(next_grad_v)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, schedule, scale):
        out, lse = _ring_forward(q, k, v, RingComm(group), schedule, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (group, schedule, scale)
        ctx.set_materialize_grads(False)  # an unused lse costs no backward work
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        group, schedule, scale = ctx.options
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_q, grad_k, grad_v = _ring_backward(grad_out, grad_lse, q, k, v, out, lse, group, schedule, scale)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "zigzag",
    return_lse: bool = False,
    window: int | None = None,
    document_ids: torch.Tensor | None = None,
    verify: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over a sequence sharded across the ranks of ``group``, forward and backward.

    Every rank calls it with its own shards (see ``parallel.layout.shard_sequence``); the result is
    this rank's shard of ``attention(q_full, k_full, v_full, causal=causal)`` in the same layout.

    Args:
        q: ``(B, Hq, S_local, D)``, this rank's query shard; ``S = S_local * world_size``.
        k: ``(B, Hkv, S_local, D)`` with ``Hq % Hkv == 0`` (GQA: query head ``h`` uses KV head ``h // (Hq // Hkv)``).
        v: ``(B, Hkv, S_local, Dv)``.
        group: the context-parallel process group (default: the whole world).
        causal: query at global position ``i`` sees keys ``j <= i``.
        scale: multiplies ``q k^T``; default ``1/sqrt(D)``.
        layout: how the sequence is sharded, ``"zigzag"`` (load-balanced causal; ``S % (2W) == 0``)
            or ``"contiguous"`` (``S % W == 0``).
        return_lse: also return the log-sum-exp of each query's scaled scores (differentiable).
        window: with ``causal``, a sliding window: the query at global position ``i`` sees keys
            ``i - window < j <= i``. Blocks outside every window are skipped.
        document_ids: ``(B or 1, S_local)`` int, this rank's shard (same layout, ``dim=1``) of the
            document id of every token (packed sequences, any document lengths): tokens attend
            only within their document. Gathered once (``S`` ints); blocks with no shared document
            are skipped.
        verify: check with one small all-gather that every rank passed the same shapes and options
            (a mismatch otherwise corrupts or hangs the ring); turn off once a loop's shapes are known.

    Returns:
        ``out (B, Hq, S_local, Dv)`` in q's dtype, and with ``return_lse`` also
        ``lse (B, Hq, S_local)`` float32 (float64 for float64 inputs).

    Example::

        dist.init_process_group("nccl")                       # under torchrun
        q, k, v = (shard_sequence(t, layout="zigzag") for t in (q_full, k_full, v_full))
        out = ring_attention(q, k, v, causal=True)            # == shard_sequence(attention(q_full, ...))
        out.sum().backward()                                  # dq, dk, dv of this rank's shards
    """
    document_ids, extra = check_masks(q, causal=causal, window=window, document_ids=document_ids)
    rank, world_size, scale = check_shards(q, k, v, group=group, causal=causal, scale=scale, layout=layout, verify=verify, extra=extra)
    documents = None
    if document_ids is not None:  # (B or 1, S), global order
        documents = unshard_sequence(document_ids.to(device=q.device, dtype=torch.int64), group, dim=1, layout=layout)
    schedule = ring_schedule(q.shape[2] * world_size, world_size, rank, layout=layout, causal=causal, window=window, documents=documents, device=q.device)
    out, lse = _RingAttention.apply(q, k, v, group, schedule, scale)
    return (out, lse) if return_lse else out
