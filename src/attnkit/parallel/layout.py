"""How a sequence is split across the ranks of a context-parallel group, and put back together.

Two layouts, for ``W`` ranks and a global sequence of ``S`` tokens:

* ``contiguous``: rank ``r`` holds tokens ``[r*S/W, (r+1)*S/W)``. Under a causal mask the last
  rank does ``W`` times the work of the first.
* ``zigzag`` (load-balanced causal): the sequence is cut into ``2W`` chunks of ``c = S/(2W)``
  tokens and rank ``r`` holds chunks ``r`` and ``2W-1-r``, one early and one late, so every rank
  does the same causal work::

      W=2, S=8:  tokens 0 1 | 2 3 | 4 5 | 6 7
                 chunk    0     1     2     3
                 rank 0 holds chunks 0, 3 -> tokens 0 1 6 7
                 rank 1 holds chunks 1, 2 -> tokens 2 3 4 5

A rank's shard is its chunks concatenated in increasing position. The hybrid (Ulysses x ring)
layout nests the two: ``layout`` over the ``R`` ring ranks, then ``contiguous`` over the ``U``
Ulysses ranks inside each ring shard (:func:`shard_hybrid`). Everything that splits or
joins a sequence (the ring schedule, the all-gather and Ulysses reorders, the tests) goes through
:func:`shard_chunks`, so there is one definition of each layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from attnkit.errors import check_arg, check_type

__all__ = [
    "LAYOUTS",
    "shard_chunks",
    "shard_positions",
    "shard",
    "unshard",
    "shard_sequence",
    "unshard_sequence",
    "shard_hybrid",
    "unshard_hybrid",
]

LAYOUTS = ("zigzag", "contiguous")
"""The sequence layouts every ``attnkit.parallel`` function accepts."""


def check_layout(layout: str, seq_len: int, world_size: int, parameter: str = "seq_len") -> None:
    """Raise unless ``layout`` is known and splits ``seq_len`` tokens evenly over ``world_size`` ranks."""
    check_arg(layout in LAYOUTS, "layout", f"one of {LAYOUTS}", layout)
    parts = 2 * world_size if layout == "zigzag" else world_size
    check_arg(
        seq_len % parts == 0,
        parameter,
        f"a multiple of {parts} ({'2 x ' if layout == 'zigzag' else ''}{world_size} ranks) for layout {layout!r}",
        seq_len,
        "Pad the sequence (and mask the padding) to a multiple, or use fewer ranks.",
    )


def shard_chunks(seq_len: int, world_size: int, rank: int, layout: str = "zigzag") -> list[tuple[int, int]]:
    """The ``[start, end)`` token ranges rank ``rank`` holds, in the order its shard stores them.

    Args:
        seq_len: global sequence length ``S``.
        world_size: ranks ``W`` in the context-parallel group.
        rank: this rank's index in the group, ``0 <= rank < W``.
        layout: ``"zigzag"`` or ``"contiguous"``.

    Returns:
        Two ranges for ``zigzag`` (chunk ``rank`` then chunk ``2W-1-rank``), one for ``contiguous``.
    """
    check_arg(isinstance(world_size, int) and world_size >= 1, "world_size", "an int >= 1", world_size)
    check_arg(isinstance(rank, int) and 0 <= rank < world_size, "rank", f"an int in [0, {world_size})", rank)
    check_layout(layout, seq_len, world_size)
    if layout == "contiguous":
        size = seq_len // world_size
        return [(rank * size, (rank + 1) * size)]
    size = seq_len // (2 * world_size)
    late = 2 * world_size - 1 - rank
    return [(rank * size, (rank + 1) * size), (late * size, (late + 1) * size)]


def shard_positions(seq_len: int, world_size: int, rank: int, layout: str = "zigzag", device=None) -> torch.Tensor:
    """Global positions ``(S/W,)`` int64 of the tokens in rank ``rank``'s shard, in shard order."""
    return torch.cat([torch.arange(start, end, device=device) for start, end in shard_chunks(seq_len, world_size, rank, layout)])


def shard(x: torch.Tensor, rank: int, world_size: int, *, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """Rank ``rank``'s shard of the full sequence ``x`` (a copy), e.g. ``(B, H, S, D) -> (B, H, S/W, D)``.

    Example::

        q_local = shard(q, rank, world_size, layout="zigzag")   # tokens chunk r and chunk 2W-1-r
    """
    check_type(x, torch.Tensor, "x")
    pieces = [x.narrow(dim, start, end - start) for start, end in shard_chunks(x.shape[dim], world_size, rank, layout)]
    return torch.cat(pieces, dim=dim)


def unshard(shards: Sequence[torch.Tensor], *, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """The full sequence from every rank's shard (``shards[r]`` from rank ``r``); inverse of :func:`shard`."""
    world_size = len(shards)
    check_arg(world_size >= 1, "shards", "at least one shard", shards)
    lengths = {s.shape[dim] for s in shards}
    check_arg(len(lengths) == 1, "shards", f"shards of one length along dim {dim}", sorted(lengths))
    seq_len = world_size * shards[0].shape[dim]
    pieces: list[tuple[int, torch.Tensor]] = []
    for rank, local in enumerate(shards):
        offset = 0
        for start, end in shard_chunks(seq_len, world_size, rank, layout):
            pieces.append((start, local.narrow(dim, offset, end - start)))
            offset += end - start
    return torch.cat([piece for _, piece in sorted(pieces, key=lambda item: item[0])], dim=dim)


def shard_sequence(x: torch.Tensor, group: dist.ProcessGroup | None = None, *, dim: int = 2, layout: str = "zigzag") -> torch.Tensor:
    """This rank's shard of ``x``, a full sequence every rank of ``group`` holds (no communication).

    Example::

        q_local = shard_sequence(q, layout="zigzag")   # then ring_attention(q_local, k_local, v_local)
    """
    return shard(x, dist.get_rank(group), dist.get_world_size(group), layout=layout, dim=dim)


def unshard_sequence(x: torch.Tensor, group: dist.ProcessGroup | None = None, *, dim: int = 2, layout: str = "zigzag") -> torch.Tensor:
    """The full sequence on every rank from each rank's shard ``x`` (an all-gather; not differentiable).

    All ranks must pass shards of the same shape.
    """
    gathered = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, x.contiguous(), group=group)
    return unshard(gathered, layout=layout, dim=dim)


def shard_hybrid(x: torch.Tensor, ring_rank: int, ring_size: int, ulysses_rank: int, ulysses_size: int, *, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """The shard of the rank at ``(ring_rank, ulysses_rank)`` of a ``ring_size x ulysses_size`` mesh:
    piece ``ulysses_rank`` (contiguous) of ring shard ``ring_rank`` (``layout``), ``(B, H, S/(R*U), D)``."""
    return shard(shard(x, ring_rank, ring_size, layout=layout, dim=dim), ulysses_rank, ulysses_size, layout="contiguous", dim=dim)


def unshard_hybrid(shards: Sequence[torch.Tensor], ring_size: int, *, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """Inverse of :func:`shard_hybrid`; ``shards`` in mesh order (ring-major: ``ring_rank * U + ulysses_rank``)."""
    ulysses_size, rest = divmod(len(shards), ring_size)
    check_arg(rest == 0 and ulysses_size >= 1, "shards", f"a multiple of ring_size={ring_size} shards", len(shards))
    rings = [unshard(shards[r * ulysses_size : (r + 1) * ulysses_size], layout="contiguous", dim=dim) for r in range(ring_size)]
    return unshard(rings, layout=layout, dim=dim)
