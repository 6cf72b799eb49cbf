"""Random blocks and BigBird (window + global tokens + random blocks, Zaheer et al. 2020).

The random blocks come from a counter-based hash of ``(seed, row, draw)`` in int64 arithmetic
without overflow, so the same pattern selects the same blocks on every device and for every
query length (rows are indexed by position, not by query index).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.errors import check_arg
from attnkit.sparse.blocks import EMPTY, UNKNOWN, Grid, classify
from attnkit.sparse.patterns import Causal, GlobalTokens, Pattern, SlidingWindow, Union, check_count

__all__ = ["RandomBlocks", "BigBird"]

_MODULUS, _MULTIPLIER = 2**31 - 1, 48271  # Park-Miller: products stay below 2**47


def _hash(seed: int, rows: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    x = torch.full_like(rows, seed % _MODULUS)
    for value in (rows, draws, torch.full_like(rows, 0x2545F491)):
        x = (x * _MULTIPLIER + value) % _MODULUS
    for _ in range(3):
        x = (x * _MULTIPLIER) % _MODULUS
    return x


@dataclass(frozen=True)
class RandomBlocks(Pattern):
    """Each row of ``block`` positions sees ``count`` random blocks of ``block`` keys (duplicate draws merge);
    causal: drawn among the blocks up to its own, and ``j <= p`` inside them."""

    count: int
    """Random draws per block row, >= 1."""
    block: int = 128
    """Granularity of the random blocks in tokens (BigBird's block); any BlockMask block size works,
    a divisor of ``block`` (and of the query offset ``Skv - Sq``) needs no element-wise refinement."""
    seed: int = 0
    causal: bool = True

    def __post_init__(self):
        check_count(self.count, "count")
        check_count(self.block, "block")
        check_count(self.seed, "seed", minimum=0)
        check_arg(isinstance(self.causal, bool), "causal", "a bool", self.causal)

    def cells(self, kv_len: int, device=None) -> torch.Tensor:
        """``(nR, nC)`` bool: row cell ``r`` (positions ``r*block ...``) sees key cell ``c``."""
        n = -(-kv_len // self.block)
        rows = torch.arange(n, device=device)[:, None].expand(n, self.count)
        draws = torch.arange(self.count, device=device)[None, :].expand(n, self.count)
        choices = rows + 1 if self.causal else torch.full_like(rows, n)
        picked = _hash(self.seed, rows, draws) % choices
        table = torch.zeros(n, n, dtype=torch.bool, device=device)
        table[rows, picked] = True
        return table

    def _allowed(self, kv_len, device):
        table, block, last, causal = self.cells(kv_len, device), self.block, (kv_len - 1) // self.block, self.causal

        def allowed(q, kv):
            hit = table[(q // block).clamp(0, last), (kv // block).clamp(0, last)]
            return hit & (kv <= q) if causal else hit

        return allowed

    def _states(self, grid: Grid):
        table = self.cells(grid.kv_len, grid.device).to(torch.int32)
        (q_first, q_last), (kv_first, kv_last) = grid.q_range, grid.kv_range
        cell = lambda positions: positions // self.block  # noqa: E731
        # A block inside one cell: the cell decides, causality shapes it inside.
        inside = (cell(q_first) == cell(q_last)) & (cell(kv_first) == cell(kv_last))
        hit = table.bool()[cell(q_first), cell(kv_first)]
        inner = Causal()._states(grid) if self.causal else classify(torch.ones_like(hit), torch.ones_like(hit), grid)
        # A block across cells (block sizes or query offset not aligned with the cells): if it
        # touches a drawn cell, refine() settles it element-wise.
        sums = torch.nn.functional.pad(table.cumsum(0).cumsum(1), (1, 0, 1, 0))
        r0, r1, c0, c1 = cell(q_first), cell(q_last) + 1, cell(kv_first), cell(kv_last) + 1
        touched = (sums[r1, c1] - sums[r0, c1] - sums[r1, c0] + sums[r0, c0]) > 0
        return torch.where(inside, torch.where(hit, inner, EMPTY), torch.where(touched, UNKNOWN, EMPTY)).to(torch.int8)


@dataclass(frozen=True)
class BigBird(Pattern):
    """``SlidingWindow(window) | GlobalTokens(num_global) | RandomBlocks(num_random, block, seed)``."""

    window: int
    """Keys per query on the causal side, itself included."""
    num_global: int = 1
    """Global positions (0 for none)."""
    num_random: int = 2
    """Random blocks per block row (0 for none)."""
    block: int = 128
    """Granularity of the random blocks in tokens."""
    seed: int = 0
    causal: bool = True

    def __post_init__(self):
        check_count(self.num_global, "num_global", minimum=0)
        check_count(self.num_random, "num_random", minimum=0)
        self.parts  # checks window, block, seed, causal

    @property
    def parts(self) -> Union:
        parts: list[Pattern] = [SlidingWindow(self.window, self.causal)]
        if self.num_global:
            parts.append(GlobalTokens(self.num_global, self.causal))
        if self.num_random:
            parts.append(RandomBlocks(self.num_random, self.block, self.seed, self.causal))
        return Union(tuple(parts))

    def _allowed(self, kv_len, device):
        return self.parts._allowed(kv_len, device)

    def _states(self, grid):
        return self.parts._states(grid)
