"""Ulysses attention: all-to-all from sequence shards to head shards, attention, and back; and the
hybrid, Ulysses inside a group (a node) x ring across groups, on a 2-D ``DeviceMesh``.

Before: rank ``r`` holds every head of its tokens ``(B, H, S/W, D)``. One ``all_to_all`` gives it
head group ``r`` of every token ``(B, H/W, S, D)``, in global order; attention then needs no more
communication (Ulysses: one kernel call; hybrid: a ring over the other mesh dimension), and a
second ``all_to_all`` returns the output to sequence shards. All-to-all is a permutation, so each
exchange's backward is the opposite exchange.

GQA: query head group ``r`` needs KV heads ``r*Hkv/W ...`` when ``Hkv % W == 0``; when there are
fewer KV heads than ranks (``W % Hkv == 0``) each rank receives the one KV head its query heads
share, so memory holds ``1`` KV head per rank instead of the ``Hq/W`` a head expansion would.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from attnkit.errors import check_arg
from attnkit.ops.kernels import backward_from_lse, forward_with_lse
from attnkit.parallel.checks import check_shards
from attnkit.parallel.layout import LAYOUTS, shard, unshard
from attnkit.parallel.ring import ring_attention

__all__ = ["ulysses_attention", "hybrid_attention"]


def _seq_to_heads(x: torch.Tensor, group, world_size: int, layout: str) -> torch.Tensor:
    """``(B, W*h, S_local, D)`` sequence shard -> ``(B, h, S, D)``, head group ``rank``, global order."""
    batch, heads, seq_local, dim = x.shape
    send = x.reshape(batch, world_size, heads // world_size, seq_local, dim).transpose(0, 1).contiguous()  # (W, B, h, S_l, D)
    received = torch.empty_like(send)  # received[i]: rank i's tokens of this rank's heads
    dist.all_to_all_single(received, send, group=group)
    return unshard(list(received.unbind(0)), layout=layout)


def _heads_to_seq(x: torch.Tensor, group, world_size: int, layout: str) -> torch.Tensor:
    """Inverse (and adjoint) of :func:`_seq_to_heads`: ``(B, h, S, D) -> (B, W*h, S_local, D)``."""
    send = torch.stack([shard(x, r, world_size, layout=layout) for r in range(world_size)])  # (W, B, h, S_l, D)
    received = torch.empty_like(send)  # received[i]: this rank's tokens of rank i's heads
    dist.all_to_all_single(received, send, group=group)
    batch, heads, seq_local, dim = received.shape[1:]
    return received.transpose(0, 1).reshape(batch, world_size * heads, seq_local, dim)


class _AllToAll(torch.autograd.Function):
    """``_seq_to_heads`` or ``_heads_to_seq``; each is the other's adjoint, so the backward is the opposite one."""

    @staticmethod
    def forward(ctx, x, to_heads, group, world_size, layout):
        ctx.options = (not to_heads, group, world_size, layout)
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group, world_size, layout)

    @staticmethod
    def backward(ctx, grad):
        to_heads, *options = ctx.options
        return (_seq_to_heads if to_heads else _heads_to_seq)(grad, *options), None, None, None, None


class _LocalAttention(torch.autograd.Function):
    """One ``forward_with_lse`` block with its ``backward_from_lse``; returns ``(out, lse)``."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        out, lse = forward_with_lse(q, k, v, causal=causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (causal, scale)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale = ctx.options
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        return (*backward_from_lse(grad_out, q, k, v, out, lse, causal=causal, scale=scale, grad_lse=grad_lse), None, None)


def _check_heads(q: torch.Tensor, k: torch.Tensor, size: int, what: str) -> None:
    check_arg(
        q.shape[1] % size == 0,
        "q.shape[1] (query heads)",
        f"a multiple of the {size} {what}",
        q.shape[1],
        "Use ring_attention, or a group whose size divides the heads.",
    )
    check_arg(
        k.shape[1] % size == 0 or size % k.shape[1] == 0,
        "k.shape[1] (KV heads)",
        f"a multiple or a divisor of the {size} {what}",
        k.shape[1],
        "Use ring_attention for this head layout.",
    )


def _exchange(q, k, v, group, world_size: int, layout: str, attend):
    """Sequence shards -> head shards, ``attend(q_h, k_h, v_h) -> (out_h, lse_h)``, -> sequence shards."""
    heads_q, heads_kv = q.shape[1], k.shape[1]
    if heads_kv % world_size:  # fewer KV heads than ranks: send each rank the one its query heads share
        index = torch.tensor([r * (heads_q // world_size) // (heads_q // heads_kv) for r in range(world_size)], device=k.device)
        k, v = k.index_select(1, index), v.index_select(1, index)  # autograd sums the copies' gradients
    q_h, k_h, v_h = (_AllToAll.apply(x, True, group, world_size, layout) for x in (q, k, v))
    out_h, lse_h = attend(q_h, k_h, v_h)
    out = _AllToAll.apply(out_h, False, group, world_size, layout)
    lse = _AllToAll.apply(lse_h.unsqueeze(-1), False, group, world_size, layout).squeeze(-1)
    return out, lse


def ulysses_attention(
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
    """Exact attention over a sharded sequence by exchanging sequence shards for head shards.

    Same arguments, shapes and result as ``ring_attention``; additionally ``Hq`` must be a multiple
    of the world size ``W``, and ``Hkv`` a multiple or a divisor of it. The layout only decides
    which tokens a rank holds (causal work is balanced whatever it is).

    Example::

        out = ulysses_attention(q_local, k_local, v_local, causal=True, layout="contiguous")
    """
    _, world_size, scale = check_shards(q, k, v, group=group, causal=causal, scale=scale, layout=layout, verify=verify)
    _check_heads(q, k, world_size, "ranks for Ulysses")
    out, lse = _exchange(q, k, v, group, world_size, layout, lambda q_h, k_h, v_h: _LocalAttention.apply(q_h, k_h, v_h, causal, scale))
    return (out, lse) if return_lse else out


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mesh,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "zigzag",
    return_lse: bool = False,
    verify: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over a sequence sharded on a 2-D mesh: Ulysses along dim 1, ring along dim 0.

    The usual placement is ring across nodes and Ulysses inside a node (its all-to-alls need the
    fast links). The sequence is sharded in ``layout`` over the ``R`` ring ranks and contiguously
    over the ``U`` Ulysses ranks inside each ring shard (``layout.shard_hybrid``).

    Args:
        q, k, v: this rank's shards ``(B, H, S/(R*U), D)`` as in ``ring_attention``; ``Hq`` a multiple
            of ``U``, ``Hkv`` a multiple or a divisor of ``U``.
        mesh: a 2-D ``torch.distributed.device_mesh.DeviceMesh`` of shape ``(R, U)``.
        causal, scale, layout, return_lse, verify: as in ``ring_attention`` (``layout`` is the ring's).

    Returns:
        As ``ring_attention``: this rank's shard of the output (and lse) in the hybrid layout.

    Example::

        mesh = init_device_mesh("cuda", (nodes, gpus_per_node), mesh_dim_names=("ring", "ulysses"))
        q_local = shard_hybrid(q, mesh.get_local_rank(0), nodes, mesh.get_local_rank(1), gpus_per_node)
        out = hybrid_attention(q_local, k_local, v_local, mesh=mesh, causal=True)
    """
    check_arg(getattr(mesh, "ndim", None) == 2, "mesh", "a 2-D DeviceMesh (ring, ulysses)", mesh)
    check_arg(layout in LAYOUTS, "layout", f"one of {LAYOUTS}", layout)
    ring_group, ulysses_group = mesh.get_group(0), mesh.get_group(1)
    _, ulysses_size, scale = check_shards(q, k, v, group=ulysses_group, causal=causal, scale=scale, layout="contiguous", verify=verify)
    _check_heads(q, k, ulysses_size, "Ulysses ranks (mesh dim 1)")

    def ring(q_h, k_h, v_h):
        return ring_attention(q_h, k_h, v_h, group=ring_group, causal=causal, scale=scale, layout=layout, return_lse=True, verify=verify)

    out, lse = _exchange(q, k, v, ulysses_group, ulysses_size, "contiguous", ring)
    return (out, lse) if return_lse else out
