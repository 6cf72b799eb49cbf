"""All-gather attention: every rank gathers the whole K/V once and attends its queries to it.

One collective instead of ``W - 1`` ring hops, and no merges: it wins where the ring's per-hop
latency dominates (short sequences) and where K/V are small next to Q (GQA, MQA). Memory grows with
the full K/V on every rank. Backward computes the gradient of the whole K/V on each rank and
sums it back to the owners with one float32 reduce-scatter.

Causal queries of a chunk that starts at global position ``s`` and ends at ``e`` see keys
``[0, e)`` with the bottom-right causal mask, so each chunk is one kernel call on a prefix of K/V::

    zigzag, W=2, rank 0 (chunks 0 and 3 of 4):  chunk 0 x keys [0, S/4)   chunk 3 x keys [0, S)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from attnkit.ops.kernels import backward_from_lse, forward_with_lse
from attnkit.parallel.checks import check_shards
from attnkit.parallel.comm import all_gather_stacked, reduce_scatter_stacked
from attnkit.parallel.layout import shard, shard_chunks, unshard

__all__ = ["allgather_attention"]


def _pieces(seq_local: int, world_size: int, rank: int, layout: str, causal: bool) -> list[tuple[slice, slice]]:
    """``(local query rows, global key range)`` per kernel call."""
    if not causal:
        return [(slice(None), slice(None))]
    pieces, offset = [], 0
    for start, end in shard_chunks(seq_local * world_size, world_size, rank, layout):
        pieces.append((slice(offset, offset + end - start), slice(0, end)))
        offset += end - start
    return pieces


def _gather(x: torch.Tensor, group, layout: str) -> torch.Tensor:
    """``(B, H, S_local, D)`` shards -> the full ``(B, H, S, D)`` in global order."""
    return unshard(list(all_gather_stacked(x, group).unbind(0)), layout=layout)


def _scatter_sum(x: torch.Tensor, group, world_size: int, layout: str) -> torch.Tensor:
    """Sum every rank's full-sequence ``x (B, H, S, D)`` and keep this rank's shard ``(B, H, S_local, D)``."""
    return reduce_scatter_stacked(torch.stack([shard(x, r, world_size, layout=layout) for r in range(world_size)]), group)


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, layout, rank, world_size):
        k_all, v_all = _gather(k, group, layout), _gather(v, group, layout)
        pieces = _pieces(q.shape[2], world_size, rank, layout, causal)
        parts = [forward_with_lse(q[:, :, rows], k_all[:, :, keys], v_all[:, :, keys], causal=causal, scale=scale) for rows, keys in pieces]
        out, lse = torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)
        ctx.save_for_backward(q, k_all, v_all, out, lse)
        ctx.options = (group, causal, scale, layout, pieces, world_size)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k_all, v_all, out, lse = ctx.saved_tensors
        group, causal, scale, layout, pieces, world_size = ctx.options
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        acc = torch.promote_types(q.dtype, torch.float32)
        grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        grad_k_all = torch.zeros(k_all.shape, dtype=acc, device=q.device)
        grad_v_all = torch.zeros(v_all.shape, dtype=acc, device=q.device)
        for rows, keys in pieces:
            dq, dk, dv = backward_from_lse(
                grad_out[:, :, rows], q[:, :, rows], k_all[:, :, keys], v_all[:, :, keys], out[:, :, rows], lse[:, :, rows],
                causal=causal, scale=scale, grad_lse=None if grad_lse is None else grad_lse[:, :, rows], accumulate=True,
            )  # fmt: skip
            grad_q[:, :, rows] = dq
            grad_k_all[:, :, keys] += dk
            grad_v_all[:, :, keys] += dv
        grad_k = _scatter_sum(grad_k_all, group, world_size, layout).to(k_all.dtype)
        grad_v = _scatter_sum(grad_v_all, group, world_size, layout).to(v_all.dtype)
        return grad_q, grad_k, grad_v, None, None, None, None, None, None


def allgather_attention(
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
    """Exact attention over a sharded sequence by gathering the whole K/V on every rank.

    Same arguments, shapes and result as ``ring_attention`` (local shards ``(B, H, S_local, D)``
    in ``layout``); needs memory for the full ``(B, Hkv, S, D)`` K and V on each rank.

    Example::

        out = allgather_attention(q_local, k_local, v_local, causal=True)   # GQA, short sequences
    """
    rank, world_size, scale = check_shards(q, k, v, group=group, causal=causal, scale=scale, layout=layout, verify=verify)
    out, lse = _AllGatherAttention.apply(q, k, v, group, causal, scale, layout, rank, world_size)
    return (out, lse) if return_lse else out
