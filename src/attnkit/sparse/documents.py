"""Packed documents: several sequences concatenated into one, each attending only within itself."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from attnkit.errors import check_arg, check_type
from attnkit.ops.cache import on_clear
from attnkit.sparse.blocks import Grid, classify
from attnkit.sparse.patterns import Pattern, check_count

__all__ = ["Documents"]


@dataclass(frozen=True, repr=False)
class Documents(Pattern):
    """Keys and queries of the same document only (causal within it unless ``causal=False``).

    Example::

        Documents((300, 200, 524))                     # 3 documents packed into 1024 tokens
        Documents.from_ids(torch.tensor([0, 0, 1, 1, 1, 2]))
    """

    lengths: tuple[int, ...]
    """Length of each document in packing order; they must sum to the key length."""
    causal: bool = True

    _exact_states = True  # _states classifies from exact per-block facts: nothing to refine
    def __post_init__(self):
        check_type(self.lengths, tuple, "lengths", "Pass a tuple of ints, e.g. Documents((512, 512)).")
        check_arg(len(self.lengths) >= 1, "lengths", "at least one document length", self.lengths)
        for length in self.lengths:
            check_count(length, "lengths", hint="Every document needs at least one token.")
        check_arg(isinstance(self.causal, bool), "causal", "a bool", self.causal)

    @classmethod
    def from_ids(cls, ids: torch.Tensor, *, causal: bool = True) -> Documents:
        """From a 1-D tensor of document ids whose equal ids are contiguous (``[0, 0, 1, 1, 1, 2]``)."""
        check_type(ids, torch.Tensor, "ids")
        check_arg(ids.dim() == 1 and ids.numel() >= 1, "ids", "a non-empty 1-D tensor of document ids", ids)
        values, counts = torch.unique_consecutive(ids, return_counts=True)
        check_arg(values.unique().numel() == values.numel(), "ids", "each document's ids contiguous (packed)", ids)
        return cls(tuple(int(c) for c in counts.tolist()), causal=causal)

    def __repr__(self) -> str:
        low, high = min(self.lengths), max(self.lengths)
        sizes = f"length {low}" if low == high else f"lengths {low}..{high}"
        return f"Documents({len(self.lengths)} documents, {sizes}, total {sum(self.lengths)}, causal={self.causal})"

    def _check_total(self, kv_len: int) -> None:
        check_arg(sum(self.lengths) == kv_len, "lengths", f"document lengths summing to the key length {kv_len}", sum(self.lengths))

    def _state_inputs(self, kv_len, device):
        """``lengths`` as an ``(n,)`` int64 tensor: an input of ``_states``, so one compiled graph
        serves documents of any lengths (read from ``self``, they would be constants)."""
        self._check_total(kv_len)
        return (_lengths_on(self.lengths, torch.device(device)),)

    def _allowed(self, kv_len, device):
        self._check_total(kv_len)
        # Each position's document: one int32 (kv_len,) tensor from one searchsorted, where repeat_interleave
        # made two int64 ones. A new length's mask allocates it anew while cached masks keep the old ones
        # alive, so its size decides how often the allocator must go to cudaMalloc (~0.2 ms on an H100).
        ends = _lengths_on(self.lengths, torch.device(device)).cumsum(0)
        ids = torch.searchsorted(ends, torch.arange(kv_len, device=device), right=True, out_int32=True)
        last, causal = kv_len - 1, self.causal

        def allowed(q, kv):
            # Clamped: FlexAttention may evaluate a mask_mod past the end of a cut block.
            same = ids[q.clamp(0, last)] == ids[kv.clamp(0, last)]
            return same & (kv <= q) if causal else same

        return allowed

    def _states(self, grid: Grid, lengths: torch.Tensor | None = None):
        if lengths is None:
            (lengths,) = self._state_inputs(grid.kv_len, grid.device)
        ends = lengths.cumsum(0)
        (q_first, q_last), (kv_first, kv_last) = grid.q_range, grid.kv_range
        doc = lambda positions: torch.searchsorted(ends, positions, right=True)  # noqa: E731
        dq_first, dq_last, dk_first, dk_last = doc(q_first), doc(q_last), doc(kv_first), doc(kv_last)
        # Documents are contiguous, so a block pair shares a document iff their id ranges overlap;
        # causally some shared pair is then allowed iff the first key precedes the last query.
        some = torch.maximum(dq_first, dk_first) <= torch.minimum(dq_last, dk_last)
        every = (dq_first == dq_last) & (dk_first == dk_last) & (dq_first == dk_first)
        if self.causal:
            some, every = some & (kv_first <= q_last), every & (kv_last <= q_first)
        return classify(some, every, grid)


@functools.lru_cache(maxsize=32)
def _lengths_on(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``lengths`` as an int64 tensor on ``device``, copied without making the host wait for the GPU;
    one copy serves a block mask's states and its ``mask_mod``."""
    host = torch.tensor(lengths, dtype=torch.int64)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


on_clear(_lengths_on.cache_clear)
