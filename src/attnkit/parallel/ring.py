"""Ring attention: exact attention over a sequence sharded across ranks, K/V passed around a ring.

Each of ``W`` steps, every rank attends its queries to the K/V block it holds, starts sending that
block to the next rank and receives the previous rank's; after ``W`` steps every query has seen
every key. Partial outputs merge through their log-sum-exp in float32 (``ops.lse.merge_partials``)
and are cast once at the end. Backward passes K/V around the ring again, together with float32
dK/dV accumulators that arrive back at their owners after the last step; dQ accumulates in float32.

Which part of a block a step computes (rank ``r`` holding the K/V of rank ``j``)::

    causal=False:        every step: all queries x all keys
    causal, contiguous:  j == r: diagonal (causal);  j < r: all x all;  j > r: nothing
    causal, zigzag:      j == r: diagonal (causal);
                         j < r: all queries x first half of the keys (chunk j, before both query chunks)
                         j > r: second half of the queries (chunk 2W-1-r, after both key chunks) x all keys

so with zigzag every rank computes the same amount at every step after the first.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from attnkit.ops.kernels import backward_from_lse, forward_with_lse
from attnkit.ops.lse import merge_partials
from attnkit.parallel.checks import check_shards
from attnkit.parallel.comm import RingComm

__all__ = ["ring_attention"]

_ALL = slice(None)


class _Block(NamedTuple):
    """The rows of the local queries and of the held K/V block one ring step computes."""

    rows: slice
    keys: slice
    causal: bool


def _block(layout: str, causal: bool, rank: int, source: int, seq_local: int) -> _Block | None:
    """What rank ``rank`` computes with the K/V block of rank ``source``; None when nothing is visible."""
    if not causal:
        return _Block(_ALL, _ALL, False)
    if source == rank:
        return _Block(_ALL, _ALL, True)
    if layout == "contiguous":
        return _Block(_ALL, _ALL, False) if source < rank else None
    half = seq_local // 2
    if source < rank:
        return _Block(_ALL, slice(None, half), False)
    return _Block(slice(half, None), _ALL, False)


def _rows(x: torch.Tensor, rows: slice) -> torch.Tensor:
    """Rows ``rows`` of ``x (B, H, S, ...)``, dense: every kernel takes a dense block (a half-block
    copy costs a fraction of a percent of its attention)."""
    return x[:, :, rows].contiguous()


def _ring_forward(q, k, v, comm: RingComm, rank: int, causal: bool, scale: float, layout: str):
    """Returns ``out (B, Hq, S_local, Dv)`` float32 (float64 for float64 inputs) and ``lse (B, Hq, S_local)``."""
    world_size, seq_local = comm.world_size, q.shape[2]
    out = lse = None
    for step in range(world_size):
        if step + 1 < world_size:
            next_k, next_v = comm.send_recv(k), comm.send_recv(v)
            comm.commit()
        block = _block(layout, causal, rank, (rank - step) % world_size, seq_local)
        if block is not None:
            part, part_lse = forward_with_lse(_rows(q, block.rows), _rows(k, block.keys), _rows(v, block.keys), causal=block.causal, scale=scale)
            if out is None:  # step 0: the diagonal block covers every row; lse keeps the kernel's dtype
                out, lse = part.to(torch.promote_types(q.dtype, torch.float32)), part_lse
            else:
                merged, merged_lse = merge_partials(out[:, :, block.rows], lse[:, :, block.rows], part, part_lse)
                out[:, :, block.rows], lse[:, :, block.rows] = merged, merged_lse
        if step + 1 < world_size:
            comm.wait()
            k, v = next_k, next_v
    return out, lse


def _ring_backward(grad_out, grad_lse, q, k, v, out, lse, group, rank: int, causal: bool, scale: float, layout: str):
    """Returns ``(dq, dk, dv)`` of the local shards in float32 (float64 for float64 inputs)."""
    kv_comm, grad_comm = RingComm(group), RingComm(group)
    world_size, seq_local = kv_comm.world_size, q.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    grad_q = torch.zeros(q.shape, dtype=acc, device=q.device)
    grad_k = grad_v = None
    for step in range(world_size):
        if step + 1 < world_size:
            next_k, next_v = kv_comm.send_recv(k), kv_comm.send_recv(v)
            kv_comm.commit()
        block = _block(layout, causal, rank, (rank - step) % world_size, seq_local)
        if block is not None:
            rows = block.rows
            parts = backward_from_lse(
                _rows(grad_out, rows), _rows(q, rows), _rows(k, block.keys), _rows(v, block.keys), _rows(out, rows), _rows(lse, rows),
                causal=block.causal, scale=scale, grad_lse=None if grad_lse is None else _rows(grad_lse, rows),
            )  # fmt: skip
        if step == 0:
            grad_k = torch.zeros(k.shape, dtype=acc, device=k.device)
            grad_v = torch.zeros(v.shape, dtype=acc, device=v.device)
        else:  # the accumulators of the K/V block now held, from the previous rank
            grad_comm.wait()
            grad_k, grad_v = next_grad_k, next_grad_v
        if block is not None:
            grad_q[:, :, block.rows] += parts[0]
            grad_k[:, :, block.keys] += parts[1]
            grad_v[:, :, block.keys] += parts[2]
        if world_size > 1:  # pass them on with the block; after the last step they are home
            next_grad_k, next_grad_v = grad_comm.send_recv(grad_k), grad_comm.send_recv(grad_v)
            grad_comm.commit()
        if step + 1 < world_size:
            kv_comm.wait()
            k, v = next_k, next_v
    if world_size > 1:
        grad_comm.wait()
        grad_k, grad_v = next_grad_k, next_grad_v
    return grad_q, grad_k, grad_v


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, layout, rank):
        out, lse = _ring_forward(q, k, v, RingComm(group), rank, causal, scale, layout)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (group, rank, causal, scale, layout)
        ctx.set_materialize_grads(False)  # an unused lse costs no backward work
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        group, rank, causal, scale, layout = ctx.options
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_q, grad_k, grad_v = _ring_backward(grad_out, grad_lse, q, k, v, out, lse, group, rank, causal, scale, layout)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None, None, None


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
        verify: check with one small all-gather that every rank passed the same shapes and options
            (a mismatch otherwise corrupts or hangs the ring); turn off once a loop's shapes are known.

    Returns:
        ``out (B, Hq, S_local, Dv)`` in q's dtype, and with ``return_lse`` also
        ``lse (B, Hq, S_local)`` float32.

    Example::

        dist.init_process_group("nccl")                       # under torchrun
        q, k, v = (shard_sequence(t, layout="zigzag") for t in (q_full, k_full, v_full))
        out = ring_attention(q, k, v, causal=True)            # == shard_sequence(attention(q_full, ...))
        out.sum().backward()                                  # dq, dk, dv of this rank's shards
    """
    rank, _, scale = check_shards(q, k, v, group=group, causal=causal, scale=scale, layout=layout, verify=verify)
    out, lse = _RingAttention.apply(q, k, v, group, causal, scale, layout, rank)
    return (out, lse) if return_lse else out
