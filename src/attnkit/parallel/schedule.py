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
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from attnkit.errors import UnsupportedError

from attnkit.parallel.layout import shard_chunks

__all__ = ["Piece", "ring_schedule"]

_ALL = slice(None)


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
        an empty list when the mask hides the whole block.
    """
    if window is not None and not causal:
        raise UnsupportedError("ring_schedule: window without causal=True (a one-sided window is not a symmetric "
                               "local window; only the causal sliding window is supported)")
    seq_local = seq_len // world_size
    device = documents.device if device is None and documents is not None else device
    q_chunks = _local(shard_chunks(seq_len, world_size, rank, layout))
    schedule = []
    for step in range(world_size):
        source = (rank - step) % world_size
        if window is None and documents is None:
            schedule.append(_unmasked(layout, causal, rank, source, seq_local))
            continue
        pieces = []
        for rows, q_start, q_end in q_chunks:
            for keys, k_start, k_end in _local(shard_chunks(seq_len, world_size, source, layout)):
                pair = _pair(q_start, q_end, k_start, k_end, causal, window, documents, device)
                if pair is not None:
                    pieces.append(Piece(rows, keys, pair[0], pair[1]))
        schedule.append(pieces)
    return schedule
