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

Overlap (plain Ulysses): the heads are cut into ``head_chunks`` groups and the exchanges run
asynchronously on NCCL's stream, pipelined with the attention kernels. While group ``g`` is
computed, group ``g+1``'s q/k/v travel in, and group ``g``'s output travels back as soon as its
kernel ends; the backward does the same with grad_out in and dq/dk/dv out. Only the first group's
inputs and the last group's outputs are exposed. Each group's q, k and v go in one
``all_to_all_single`` (one flat buffer per peer), and the output returns in one. Measured on 2
H200s (``benchmarks/results/parallel/``): 2 groups as fast as 1, 4 groups 3% slower at 32k tokens,
because NCCL's waiting kernels occupy SMs the attention kernel then lacks; so ``head_chunks``
defaults to 1 and stays an option for slower links, where the exchange outweighs that.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from attnkit.errors import UnsupportedError, check_arg
from attnkit.ops.kernels import backward_from_lse, forward_with_lse
from attnkit.parallel.checks import check_masks, check_shards
from attnkit.parallel.layout import LAYOUTS, shard_chunks, unshard_sequence
from attnkit.parallel.ring import ring_attention
from attnkit.sparse import Documents, SlidingWindow, sparse_attention

__all__ = ["ulysses_attention", "hybrid_attention"]


def _to_head_rows(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """``(B, W*h, S_l, D) -> (W, B, h, S_l, D)`` view: row ``r`` is head group ``r`` of this rank's tokens."""
    batch, heads, seq_local, dim = x.shape
    return x.reshape(batch, world_size, heads // world_size, seq_local, dim).transpose(0, 1)


def _row_shape(x: torch.Tensor, world_size: int) -> torch.Size:
    """Shape of one row of :func:`_to_head_rows` of ``x``: ``(B, h, S_l, D)``."""
    return torch.Size((x.shape[0], x.shape[1] // world_size, *x.shape[2:]))


def _write_head_rows(target: torch.Tensor, rows: torch.Tensor) -> None:
    """``target (B, W*h, S_l, D)`` (a view into a result) <- ``rows (W, B, h, S_l, D)``, inverse of :func:`_to_head_rows`."""
    target.unflatten(1, (rows.shape[0], -1)).transpose(0, 1).copy_(rows)


def _pack(rows: list[torch.Tensor]) -> torch.Tensor:
    """A ``(W, n)`` send buffer from per-peer rows ``(W, ...)``: peer ``r`` gets every part's row ``r``, back to back."""
    sizes = [row[0].numel() for row in rows]
    send = torch.empty(rows[0].shape[0], sum(sizes), dtype=rows[0].dtype, device=rows[0].device)
    for row, part in zip(rows, send.split(sizes, dim=1)):
        part.view(row.shape).copy_(row)
    return send


def _unpack(received: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """Views ``(W, *shape)`` of a received ``(W, n)`` buffer, one per part (``_pack``'s inverse)."""
    sizes = [torch.Size(shape).numel() for shape in shapes]
    return [part.view(received.shape[0], *shape) for part, shape in zip(received.split(sizes, dim=1), shapes)]


def _exchange_async(send: torch.Tensor, group):
    """Start an ``all_to_all_single`` of a ``(W, n)`` buffer; returns ``(work, received)``."""
    received = torch.empty_like(send)
    return dist.all_to_all_single(received, send, group=group, async_op=True), received


def _chunk_order(seq_len: int, world_size: int, layout: str) -> tuple[int, list[int]]:
    """``(size, order)``: the layout's pieces all have ``size`` tokens; ``order[i]`` is the global
    index of the ``i``-th piece when the ranks' shards are laid end to end in rank order."""
    pieces = [piece for rank in range(world_size) for piece in shard_chunks(seq_len, world_size, rank, layout)]
    size = pieces[0][1] - pieces[0][0]
    assert all(end - start == size for start, end in pieces), "both layouts cut the sequence into equal pieces"
    return size, [start // size for start, _ in pieces]


def _reordered(chunks: torch.Tensor, order: list[int]) -> torch.Tensor:
    """``chunks (B, h, n, size, D)`` with dim 2 taken in ``order`` (a view when it is the identity)."""
    if order == sorted(order):
        return chunks
    return chunks.index_select(2, torch.tensor(order, device=chunks.device))


def _heads_from_rows(rows: torch.Tensor, layout: str) -> torch.Tensor:
    """``(W, B, h, S_l, D)``, row ``i`` = rank ``i``'s tokens of this rank's heads -> ``(B, h, S, D)`` in global order (one copy)."""
    world_size, batch, heads, seq_local, dim = rows.shape
    size, order = _chunk_order(world_size * seq_local, world_size, layout)
    chunks = rows.movedim(0, 2).reshape(batch, heads, len(order), size, dim)  # in rank order
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return _reordered(chunks, inverse).reshape(batch, heads, world_size * seq_local, dim)


def _seq_rows(x: torch.Tensor, world_size: int, layout: str) -> torch.Tensor:
    """``(B, h, S, D) -> (W, B, h, S_l, D)``: row ``r`` is rank ``r``'s tokens (a view for ``contiguous``)."""
    batch, heads, seq_len, dim = x.shape
    size, order = _chunk_order(seq_len, world_size, layout)
    chunks = _reordered(x.unflatten(2, (len(order), size)), order)
    return chunks.unflatten(2, (world_size, -1)).flatten(3, 4).movedim(2, 0)


def _seq_to_heads(x: torch.Tensor, group, world_size: int, layout: str) -> torch.Tensor:
    """``(B, W*h, S_local, D)`` sequence shard -> ``(B, h, S, D)``, head group ``rank``, global order."""
    rows = _to_head_rows(x, world_size)
    work, received = _exchange_async(_pack([rows]), group)
    work.wait()
    return _heads_from_rows(_unpack(received, [rows.shape[1:]])[0], layout)


def _heads_to_seq(x: torch.Tensor, group, world_size: int, layout: str) -> torch.Tensor:
    """Inverse (and adjoint) of :func:`_seq_to_heads`: ``(B, h, S, D) -> (B, W*h, S_local, D)``."""
    rows = _seq_rows(x, world_size, layout)
    work, received = _exchange_async(_pack([rows]), group)
    work.wait()
    (back,) = _unpack(received, [rows.shape[1:]])  # back[i]: this rank's tokens of rank i's heads
    batch, heads, seq_local, dim = back.shape[1:]
    return back.transpose(0, 1).reshape(batch, world_size * heads, seq_local, dim)


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


class _PipelinedUlysses(torch.autograd.Function):
    """Plain Ulysses with the exchanges overlapped with the kernels, ``head_chunks`` groups at a time.

    Forward: ``(q, k, v)`` sequence shards -> ``out`` (and ``lse`` when asked) sequence shards.
    Saves each group's head-sharded q, k, v, out, lse for the backward, which pipelines the same
    way: grad_out (and grad_lse) in, ``backward_from_lse``, dq/dk/dv out.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, group, world_size, layout, chunks, need_lse):
        q_groups, k_groups, v_groups = (x.chunk(chunks, dim=1) for x in (q, k, v))

        def send_inputs(g):
            return _exchange_async(_pack([_to_head_rows(x[g], world_size) for x in (q_groups, k_groups, v_groups)]), group)

        out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:3], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device) if need_lse else None
        saved, returning, pending = [], [], send_inputs(0)
        for g in range(chunks):
            following = send_inputs(g + 1) if g + 1 < chunks else None
            work, received = pending
            work.wait()
            shapes = [_row_shape(x[g], world_size) for x in (q_groups, k_groups, v_groups)]
            q_h, k_h, v_h = (_heads_from_rows(rows, layout) for rows in _unpack(received, shapes))
            out_h, lse_h = forward_with_lse(q_h, k_h, v_h, causal=causal, scale=scale)
            saved += [q_h, k_h, v_h, out_h, lse_h]
            returning.append(_exchange_async(_pack([_seq_rows(out_h, world_size, layout)]), group))
            if need_lse:
                returning.append(_exchange_async(_pack([_seq_rows(lse_h.unsqueeze(-1), world_size, layout)]), group))
            pending = following
        per_group = 2 if need_lse else 1
        for g in range(chunks):
            heads = slice(g * q.shape[1] // chunks, (g + 1) * q.shape[1] // chunks)
            for i, target in enumerate([out] + ([lse.unsqueeze(-1)] if need_lse else [])):
                work, received = returning[g * per_group + i]
                work.wait()
                (rows,) = _unpack(received, [_row_shape(target[:, heads], world_size)])
                _write_head_rows(target[:, heads], rows)
        ctx.save_for_backward(*saved)
        ctx.options = (causal, scale, group, world_size, layout, chunks, k.shape, v.shape)
        ctx.set_materialize_grads(False)
        return (out, lse) if need_lse else out

    @staticmethod
    def backward(ctx, grad_out, grad_lse=None):
        causal, scale, group, world_size, layout, chunks, k_shape, v_shape = ctx.options
        saved = ctx.saved_tensors
        if grad_out is None:  # only lse was used
            grad_out = torch.zeros(*grad_lse.shape, v_shape[-1], dtype=saved[3].dtype, device=grad_lse.device)
        q_shape = (*grad_out.shape[:3], saved[0].shape[-1])
        grad_groups = grad_out.chunk(chunks, dim=1)
        lse_groups = None if grad_lse is None else grad_lse.unsqueeze(-1).chunk(chunks, dim=1)

        def send_grads(g):
            return _exchange_async(_pack([_to_head_rows(grad_groups[g], world_size)]), group)

        grads = [torch.empty(shape, dtype=x.dtype, device=grad_out.device) for shape, x in zip((q_shape, k_shape, v_shape), saved)]
        returning, pending = [], send_grads(0)
        for g in range(chunks):
            following = send_grads(g + 1) if g + 1 < chunks else None
            q_h, k_h, v_h, out_h, lse_h = saved[5 * g : 5 * g + 5]
            grad_lse_h = None if lse_groups is None else _seq_to_heads(lse_groups[g], group, world_size, layout).squeeze(-1)
            work, received = pending
            work.wait()
            (rows,) = _unpack(received, [_row_shape(grad_groups[g], world_size)])
            grad_out_h = _heads_from_rows(rows, layout)
            parts = backward_from_lse(grad_out_h, q_h, k_h, v_h, out_h, lse_h, causal=causal, scale=scale, grad_lse=grad_lse_h)
            returning.append(_exchange_async(_pack([_seq_rows(x, world_size, layout) for x in parts]), group))
            pending = following
        for g, (work, received) in enumerate(returning):
            work.wait()
            targets = [x[:, g * x.shape[1] // chunks : (g + 1) * x.shape[1] // chunks] for x in grads]
            for target, rows in zip(targets, _unpack(received, [_row_shape(x, world_size) for x in targets])):
                _write_head_rows(target, rows)
        return (*grads, None, None, None, None, None, None, None)


def _head_chunks(requested: int, q: torch.Tensor, heads_kv: int, world_size: int) -> int:
    """``requested`` head groups for the pipelined exchange, checked: each group's heads split evenly over the ranks."""
    check_arg(isinstance(requested, int) and requested >= 1, "head_chunks", "a positive int", requested)
    for heads, what in ((q.shape[1], "query heads"), (heads_kv, "KV heads sent per rank")):
        check_arg(heads % (requested * world_size) == 0, "head_chunks", f"a divisor of {heads} {what} / {world_size} ranks", requested,
                  "Use head_chunks=1.")  # fmt: skip
    return requested


def _pattern(causal: bool, window: int | None, documents: torch.Tensor | None):
    """The sparsity pattern of a window and/or packed documents ``(B or 1, S)`` in global order."""
    parts = [] if window is None else [SlidingWindow(window)]
    if documents is not None:
        documents = documents.cpu()  # one copy (S ints): the checks below then never wait on the GPU
        if documents.shape[0] > 1 and not bool((documents == documents[:1]).all()):
            raise UnsupportedError(
                "document_ids: ulysses_attention runs one packing for the whole batch; these rows differ. "
                "Use ring_attention, which takes a packing per batch entry."
            )
        parts.append(Documents.from_ids(documents[0], causal=causal))
    return parts[0] if len(parts) == 1 else parts[0] & parts[1]


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


def _kv_per_rank(q, k, v, world_size: int):
    """``k, v`` whose heads split evenly over the ranks: unchanged, or, with fewer KV heads than
    ranks, the one KV head each rank's query heads share, once per rank (autograd sums the copies)."""
    heads_q, heads_kv = q.shape[1], k.shape[1]
    if heads_kv % world_size == 0:
        return k, v
    index = torch.tensor([r * (heads_q // world_size) // (heads_q // heads_kv) for r in range(world_size)], device=k.device)
    return k.index_select(1, index), v.index_select(1, index)


def _exchange(q, k, v, group, world_size: int, layout: str, attend):
    """Sequence shards -> head shards, ``attend(q_h, k_h, v_h) -> (out_h, lse_h)``, -> sequence shards."""
    k, v = _kv_per_rank(q, k, v, world_size)
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
    head_chunks: int = 1,
    window: int | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over a sharded sequence by exchanging sequence shards for head shards.

    Same arguments, shapes and result as ``ring_attention``; additionally ``Hq`` must be a multiple
    of the world size ``W``, and ``Hkv`` a multiple or a divisor of it. The layout only decides
    which tokens a rank holds (causal work is balanced whatever it is). ``head_chunks``: head
    groups whose exchanges overlap the previous group's kernel (each must split evenly over the
    ranks). 1 by default: on 2 H200s over NVLink, 2 groups were no faster and 4 slower at 32k-512k
    tokens (NCCL's kernels take SMs from attention while they wait; see the module docstring).
    ``window`` and ``document_ids``: as in ``ring_attention``. After the exchange every rank holds
    whole sequences, so the mask runs as a sparsity pattern (``attnkit.sparse``: equal documents
    on one dense kernel call, other masks on FlexAttention on CUDA, the exact gathered path on
    CPU); ``document_ids`` must then be one packing for the whole batch (``(1, S_local)`` or equal rows).

    Example::

        out = ulysses_attention(q_local, k_local, v_local, causal=True, layout="contiguous")
    """
    document_ids, extra = check_masks(q, causal=causal, window=window, document_ids=document_ids)
    _, world_size, scale = check_shards(q, k, v, group=group, causal=causal, scale=scale, layout=layout, verify=verify, extra=extra)
    _check_heads(q, k, world_size, "ranks for Ulysses")
    if window is not None or document_ids is not None:
        check_arg(head_chunks == 1, "head_chunks", "1 with a window or document_ids", head_chunks)
        pattern = _pattern(causal, window, None if document_ids is None else unshard_sequence(document_ids.to(q.device), group, dim=1, layout=layout))

        def attend(q_h, k_h, v_h):
            return sparse_attention(q_h, k_h, v_h, pattern, scale=scale, return_lse=True)

        out, lse = _exchange(q, k, v, group, world_size, layout, attend)
        return (out, lse) if return_lse else out
    k, v = _kv_per_rank(q, k, v, world_size)
    chunks = _head_chunks(head_chunks, q, k.shape[1], world_size)
    return _PipelinedUlysses.apply(q, k, v, causal, scale, group, world_size, layout, chunks, return_lse)


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
