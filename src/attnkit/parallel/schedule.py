"""Which blocks a ring step computes: causal, sliding-window and packed-document masks on global positions.

Rank ``r`` holding the K/V of rank ``j`` at some ring step attends its local query rows to that
block. A :class:`Piece` is one kernel call of that step: local query rows, local key rows, and the
mask in the kernel's terms (a causal flag for a square diagonal, a bool mask, or nothing). Without a
window or documents a step is at most one piece (the zigzag rule in ``ring``'s docstring). With
them, a step splits into chunk pairs (a zigzag shard is two chunks, so four pairs) and the mask of
each pair comes from the tokens' global positions (``layout.shard_chunks``):

    query at position i sees key at position j iff  (not causal or j <= i)
                                                and (window is None or i - j < window)
                                                and document[i] == document[j]

A pair whose mask is empty is skipped (no kernel call, no gradient work), so a window of ``w``
tokens costs ``O(S * w)`` per sequence instead of ``O(S^2 / 2)``; :func:`ring_schedule` says which
pairs run, and the tests count them.

Packed documents without a window (the same ids in every batch row) need no mask at all: a
document is a run of equal ids, and a pair splits into one dense rectangle per run pair with the
same id (full when its keys precede its queries, the causal diagonal when both are the same run).
When no document crosses from one rank's chunk into another's, every step after the first is empty
on every rank, and the schedule is that one step: the ring then moves no K/V at all. A pair with
more than ``MAX_RUN_PIECES`` such rectangles (many short documents) takes the bool-mask
piece instead, one kernel call rather than hundreds of tiny ones. A bool mask makes the CUDA kernels
read an additive bias of ``rows x keys``: 16 documents over 128k tokens on 4 H200s took 657 ms and
50.7 GiB per rank as mask pieces, 12.4 ms and 2.1 GiB as rectangles (``benchmarks/results/parallel/
parallel-nvidia-h200-4gpu-2026-11-27-run2-documents16-mask-pieces.json`` and ``...-run3-documents16.json``).
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

import torch

from attnkit.errors import UnsupportedError

from attnkit.parallel.layout import shard_chunks

__all__ = ["Piece", "ring_schedule"]

_ALL = slice(None)
MAX_RUN_PIECES = 64
"""Most dense per-document rectangles in one chunk pair before it becomes one bool-mask piece."""


class Piece(NamedTuple):
    """One kernel call of a ring step."""

    rows: slice
    """Local query rows."""
    keys: slice
    """Rows of the held K/V block."""
    causal: bool
    """Bottom-right causal (a square diagonal piece: the same global positions on both sides)."""
    mask: torch.Tensor | None
    """Bool ``(B or 1, 1, rows, keys)``, True = attend; None = every key (besides ``causal``)."""


def _unmasked(layout: str, causal: bool, rank: int, source: int, seq_local: int) -> list[Piece]:
    """Causal or full attention: one piece per step at most (the layouts' closed form)."""
    if not causal:
        return [Piece(_ALL, _ALL, False, None)]
    if source == rank:
        return [Piece(_ALL, _ALL, True, None)]
    if layout == "contiguous":
        return [Piece(_ALL, _ALL, False, None)] if source < rank else []
    half = seq_local // 2
    if source < rank:  # both query chunks come after the early key chunk, before the late one
        return [Piece(_ALL, slice(None, half), False, None)]
    return [Piece(slice(half, None), _ALL, False, None)]  # only the late query chunk follows both key chunks


def _local(chunks: list[tuple[int, int]]) -> list[tuple[slice, int, int]]:
    """``(local rows, global start, global end)`` of each chunk of a shard."""
    pieces, offset = [], 0
    for start, end in chunks:
        pieces.append((slice(offset, offset + end - start), start, end))
        offset += end - start
    return pieces


def _pair(q_start, q_end, k_start, k_end, causal, window, documents, device) -> tuple[bool, torch.Tensor | None] | None:
    """``(causal, mask)`` of one chunk pair, or None when the pair's mask is empty."""
    lowest, highest = q_start - (k_end - 1), (q_end - 1) - k_start  # range of (query - key) positions
    if (causal and highest < 0) or (window is not None and lowest >= window):
        return None
    diagonal = causal and (q_start, q_end) == (k_start, k_end) and (window is None or highest < window)
    visible = diagonal or ((not causal or lowest >= 0) and (window is None or highest < window))
    mask = None
    if not visible:
        distance = torch.arange(q_start, q_end, device=device).unsqueeze(1) - torch.arange(k_start, k_end, device=device)
        mask = distance < window if window is not None else torch.ones_like(distance, dtype=torch.bool)
        if causal:
            mask &= distance >= 0
        mask = mask[None, None]
    if documents is not None:
        same = (documents[:, q_start:q_end].unsqueeze(-1) == documents[:, None, k_start:k_end]).unsqueeze(1)  # (B, 1, Sq, Skv)
        if not same.all():
            if diagonal:  # fold the causal flag into the mask
                mask, diagonal = torch.ones(q_end - q_start, k_end - k_start, dtype=torch.bool, device=device).tril()[None, None], False
            mask = same if mask is None else same & mask
    if mask is not None and not mask.any():
        return None
    return diagonal, mask


def _runs(ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(start, end, id)`` of each run of equal ids in a 1-D (CPU) tensor."""
    values, counts = torch.unique_consecutive(ids, return_counts=True)
    ends = counts.cumsum(0).tolist()
    return [(end - count, end, value) for end, count, value in zip(ends, counts.tolist(), values.tolist())]


def _overlapping(runs: list[tuple[int, int, int]], starts: list[int], start: int, end: int) -> list[tuple[int, int, int]]:
    """The runs cut to ``[start, end)`` (``runs`` sorted and covering every position; ``starts`` their starts)."""
    cut = []
    for run_start, run_end, value in runs[bisect.bisect_right(starts, start) - 1 :]:
        if run_start >= end:
            break
        cut.append((max(run_start, start), min(run_end, end), value))
    return cut


def _run_pieces(q_rows: slice, q_start: int, q_end: int, k_rows: slice, k_start: int, k_end: int, causal: bool,
                runs: list[tuple[int, int, int]], starts: list[int]) -> list[Piece] | None:  # fmt: skip
    """The dense rectangles of one chunk pair (document runs with the same id), or None to use a mask
    (keys and queries interleave, or more than ``MAX_RUN_PIECES`` rectangles). Linear in the runs."""
    key_runs: dict[int, list[tuple[int, int]]] = {}
    for c, d, doc in _overlapping(runs, starts, k_start, k_end):
        key_runs.setdefault(doc, []).append((c, d))
    pieces = []
    for a, b, doc in _overlapping(runs, starts, q_start, q_end):
        for c, d in key_runs.get(doc, ()):
            if causal and c > b - 1:  # every key after every query
                continue
            diagonal = causal and (a, b) == (c, d)
            if (causal and not diagonal and d - 1 > a) or len(pieces) == MAX_RUN_PIECES:  # interleaved, or too many
                return None
            rows = slice(q_rows.start + a - q_start, q_rows.start + b - q_start)
            keys = slice(k_rows.start + c - k_start, k_rows.start + d - k_start)
            pieces.append(Piece(rows, keys, diagonal, None))
    return pieces


def _stays_on_its_rank(runs: list[tuple[int, int, int]], seq_len: int, world_size: int, layout: str) -> bool:
    """True when no document run crosses a boundary between chunks of two different ranks."""
    owners = [rank for rank in range(world_size) for _ in shard_chunks(seq_len, world_size, rank, layout)]
    starts = [start for rank in range(world_size) for start, _ in shard_chunks(seq_len, world_size, rank, layout)]
    owner_at = dict(zip(starts, owners))  # chunk start -> owning rank
    chunk = min(end - start for start, end in shard_chunks(seq_len, world_size, 0, layout))
    crossings = {b for b in range(chunk, seq_len, chunk) if owner_at[b] != owner_at[b - chunk]}
    return not any(b in crossings for start, end, _ in runs for b in range((start // chunk + 1) * chunk, end, chunk))


def ring_schedule(
    seq_len: int,
    world_size: int,
    rank: int,
    *,
    layout: str = "zigzag",
    causal: bool = False,
    window: int | None = None,
    documents: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> list[list[Piece]]:
    """The pieces rank ``rank`` computes at each of the ``world_size`` ring steps.

    Args:
        seq_len: global sequence length ``S``.
        world_size, rank: the context-parallel group and this rank's index in it.
        layout: ``"zigzag"`` or ``"contiguous"``.
        causal: keys after the query are hidden.
        window: with ``causal``, a query sees only the ``window`` latest keys (itself included).
        documents: ``(B or 1, S)`` int document id of every global position (packed sequences);
            tokens of different documents never attend to each other.
        device: where the masks live (default: the CPU, or ``documents``' device).

    Returns:
        ``schedule[step]``: the pieces of the K/V block of rank ``(rank - step) % world_size``;
        an empty list when the mask hides the whole block. Only step 0 (``len(schedule) == 1``)
        when no rank needs another's block (packed documents that never straddle two ranks'
        chunks): the same answer on every rank, so the ring then moves nothing.
    """
    if window is not None and not causal:
        raise UnsupportedError("ring_schedule: window without causal=True (a one-sided window is not a symmetric "
                               "local window; only the causal sliding window is supported)")
    seq_local = seq_len // world_size
    device = documents.device if device is None and documents is not None else device
    q_chunks = _local(shard_chunks(seq_len, world_size, rank, layout))
    runs = None
    if documents is not None and window is None:
        on_host = documents.cpu()  # one copy (S ints), then no more waits on the GPU
        runs = _runs(on_host[0]) if bool((on_host == on_host[:1]).all()) else None
    starts = None if runs is None else [run[0] for run in runs]
    steps = 1 if runs is not None and _stays_on_its_rank(runs, seq_len, world_size, layout) else world_size
    schedule = []
    for step in range(steps):
        source = (rank - step) % world_size
        if window is None and documents is None:
            schedule.append(_unmasked(layout, causal, rank, source, seq_local))
            continue
        pieces = []
        for rows, q_start, q_end in q_chunks:
            for keys, k_start, k_end in _local(shard_chunks(seq_len, world_size, source, layout)):
                rectangles = None if runs is None else _run_pieces(rows, q_start, q_end, keys, k_start, k_end, causal, runs, starts)
                if rectangles is not None:
                    pieces.extend(rectangles)
                    continue
                pair = _pair(q_start, q_end, k_start, k_end, causal, window, documents, device)
                if pair is not None:
                    pieces.append(Piece(rows, keys, pair[0], pair[1]))
        schedule.append(pieces)
    return schedule
