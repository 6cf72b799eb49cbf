"""Block-level geometry: the ``(nQ, nKV)`` table of block states and the FlexAttention ``BlockMask`` built from it.

A sparsity pattern describes itself per block, never per element: for each pair of a query block
and a key block it says EMPTY (skip), PARTIAL (compute, apply the mask inside) or FULL (compute,
no mask needed) — the three kinds of block FlexAttention distinguishes. That table has
``ceil(Sq/bq) * ceil(Skv/bk)`` entries (1M int8 at 128k tokens and block 128), so building a
mask never touches the ``Sq * Skv`` elements (``create_block_mask`` evaluates the mask_mod on all
of them: 10-18 ms per call on an H100, and 128 GiB at 128k without ``_compile=True``).

A fourth state, UNKNOWN, comes from composition: a block PARTIAL in both operands of ``|`` may be
FULL, one PARTIAL in both operands of ``&`` may be EMPTY. :func:`refine` settles those few blocks
(diagonal and boundary blocks) by evaluating the mask on their ``bq * bk`` elements only.

Conventions: positions are in key coordinates (bottom-right aligned like ``attention()``'s
causal: query ``i`` sits at position ``i + Skv - Sq``); a block cut by the end of a sequence is
never FULL (as in ``create_block_mask``, whose padding counts as masked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["EMPTY", "PARTIAL", "FULL", "UNKNOWN", "MaskFn", "Grid", "classify", "either", "both", "refine", "block_mask_from_states", "computed_elements"]

EMPTY, PARTIAL, FULL, UNKNOWN = 0, 1, 2, 3
"""Block states (int8): nothing allowed, some allowed, all allowed, not known yet (see :func:`refine`)."""

MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``allowed(q_pos, kv_idx) -> bool`` on broadcastable int64 tensors (query positions in key coordinates)."""

_REFINE_CHUNK = 1 << 22  # elements evaluated at once when refining UNKNOWN blocks


@dataclass(frozen=True)
class Grid:
    """The block grid of one ``(Sq, Skv)`` problem; per-block first/last real positions as broadcastable columns/rows."""

    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    device: torch.device

    @property
    def offset(self) -> int:
        """Position of query 0 in key coordinates (``Skv - Sq``, bottom-right alignment)."""
        return self.kv_len - self.q_len

    @property
    def shape(self) -> tuple[int, int]:
        """``(nQ, nKV)``: blocks per dimension, rounded up."""
        return -(-self.q_len // self.block_q), -(-self.kv_len // self.block_kv)

    def _ends(self, length: int, block: int, count: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = torch.arange(count, device=self.device, dtype=torch.int64) * block
        last = torch.clamp(first + block, max=length) - 1
        return first + shift, last + shift

    @property
    def q_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last query position of each query block, ``(nQ, 1)`` each."""
        first, last = self._ends(self.q_len, self.block_q, self.shape[0], self.offset)
        return first[:, None], last[:, None]

    @property
    def kv_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last key index of each key block, ``(1, nKV)`` each."""
        first, last = self._ends(self.kv_len, self.block_kv, self.shape[1], 0)
        return first[None, :], last[None, :]

    @property
    def complete(self) -> torch.Tensor:
        """``(nQ, nKV)`` bool: the block lies wholly inside the sequences (only those can be FULL)."""
        n_q, n_kv = self.shape
        rows = torch.arange(n_q, device=self.device)[:, None] * self.block_q + self.block_q <= self.q_len
        cols = torch.arange(n_kv, device=self.device)[None, :] * self.block_kv + self.block_kv <= self.kv_len
        return rows & cols

    @property
    def distance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Least and greatest ``q_pos - kv_idx`` over each block, ``(nQ, nKV)``; every value between occurs."""
        q_first, q_last = self.q_range
        kv_first, kv_last = self.kv_range
        return q_first - kv_last, q_last - kv_first


def classify(any_allowed: torch.Tensor, all_allowed: torch.Tensor, grid: Grid) -> torch.Tensor:
    """States from exact per-block facts: some pair allowed / every pair allowed (cut blocks not FULL)."""
    full = all_allowed & grid.complete
    return torch.where(full, FULL, torch.where(any_allowed, PARTIAL, EMPTY)).to(torch.int8)


def either(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """States of ``a | b``: exact unless both are PARTIAL (or either UNKNOWN) there."""
    settled = torch.where(a == EMPTY, b, torch.where(b == EMPTY, a, UNKNOWN))
    return torch.where((a == FULL) | (b == FULL), FULL, settled).to(torch.int8)


def both(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """States of ``a & b``: exact unless both are PARTIAL (or either UNKNOWN) there."""
    settled = torch.where(a == FULL, b, torch.where(b == FULL, a, UNKNOWN))
    return torch.where((a == EMPTY) | (b == EMPTY), EMPTY, settled).to(torch.int8)


def refine(states: torch.Tensor, grid: Grid, allowed: MaskFn) -> torch.Tensor:
    """Replace UNKNOWN blocks by their exact state, evaluating ``allowed`` on those blocks' elements only."""
    rows, cols = torch.nonzero(states == UNKNOWN, as_tuple=True)
    if rows.numel() == 0:
        return states
    states = states.clone()
    q_steps = torch.arange(grid.block_q, device=grid.device)
    kv_steps = torch.arange(grid.block_kv, device=grid.device)
    per_chunk = max(1, _REFINE_CHUNK // (grid.block_q * grid.block_kv))
    for start in range(0, rows.numel(), per_chunk):
        r, c = rows[start : start + per_chunk], cols[start : start + per_chunk]
        q_idx = r[:, None, None] * grid.block_q + q_steps[None, :, None]  # (n, bq, 1)
        kv_idx = c[:, None, None] * grid.block_kv + kv_steps[None, None, :]  # (n, 1, bk)
        inside = (q_idx < grid.q_len) & (kv_idx < grid.kv_len)
        hit = allowed(q_idx.clamp(max=grid.q_len - 1) + grid.offset, kv_idx.clamp(max=grid.kv_len - 1)) & inside
        any_hit, all_hit = hit.flatten(1).any(1), hit.flatten(1).all(1)  # all_hit is False for cut blocks
        states[r, c] = torch.where(all_hit, FULL, torch.where(any_hit, PARTIAL, EMPTY)).to(torch.int8)
    return states


def computed_elements(computed: torch.Tensor, grid: Grid) -> int:
    """Score elements a block-sparse kernel computes for ``computed (nQ, nKV)`` bool: each computed block's part inside the sequences."""
    rows = torch.clamp(grid.q_len - torch.arange(computed.shape[0]) * grid.block_q, max=grid.block_q)
    cols = torch.clamp(grid.kv_len - torch.arange(computed.shape[1]) * grid.block_kv, max=grid.block_kv)
    return int((rows[:, None] * cols[None, :] * computed.cpu().to(torch.int64)).sum())


def _ordered(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The same ordering as create_block_mask (stable descending sort of 0/1): the selected key
    # blocks first, ascending, then the rest; so both constructions give identical tensors.
    table = table.to(torch.int32)
    counts = table.sum(-1, dtype=torch.int32)
    indices = torch.argsort(table, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.contiguous(), indices.contiguous()


def block_mask_from_states(states: torch.Tensor, grid: Grid, mask_mod):
    """A FlexAttention ``BlockMask`` from block states ``(B|1, H|1, nQ, nKV)`` (no UNKNOWN left).

    ``mask_mod(b, h, q_idx, kv_idx)`` is applied by the kernel inside PARTIAL blocks only.
    The transposed (query-side) tables for the backward are derived by ``from_kv_blocks``,
    also at block level.
    """
    from torch.nn.attention.flex_attention import BlockMask

    assert states.dim() == 4 and not bool((states == UNKNOWN).any()), "refine() the states first"
    partial, partial_idx = _ordered(states == PARTIAL)
    full, full_idx = _ordered(states == FULL)
    return BlockMask.from_kv_blocks(
        partial, partial_idx, full, full_idx,
        BLOCK_SIZE=(grid.block_q, grid.block_kv), mask_mod=mask_mod, seq_lengths=(grid.q_len, grid.kv_len),
    )  # fmt: skip
