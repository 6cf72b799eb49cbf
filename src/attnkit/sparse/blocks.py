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

import functools
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["EMPTY", "PARTIAL", "FULL", "UNKNOWN", "MaskFn", "Grid", "classify", "either", "both", "refine", "block_tables",
           "block_mask_from_tables", "block_mask_from_states", "on_device", "computed_elements"]

EMPTY, PARTIAL, FULL, UNKNOWN = 0, 1, 2, 3
"""Block states (int8): nothing allowed, some allowed, all allowed, not known yet (see :func:`refine`)."""

MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``allowed(q_pos, kv_idx) -> bool`` on broadcastable int64 tensors (query positions in key coordinates)."""

_dispatch_modes = torch._C._len_torch_dispatch_stack  # make_fx, FakeTensorMode, ...
_REFINE_CHUNK = 1 << 22  # elements evaluated at once when refining UNKNOWN blocks


class _per_grid:
    """``functools.cached_property`` without the lock it takes before Python 3.12 (Dynamo cannot enter it):
    Grid's tensors are made once per Grid, which every pattern's ``_states`` reads, a composition several times."""

    def __init__(self, method):
        self.method, self.__doc__ = method, method.__doc__

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, grid, owner=None):
        if grid is None:
            return self
        if self.name not in grid.__dict__:
            grid.__dict__[self.name] = self.method(grid)
        return grid.__dict__[self.name]


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
        first = torch.arange(shift, shift + count * block, block, device=self.device, dtype=torch.int64)
        return first, torch.clamp(first + (block - 1), max=shift + length - 1)

    @_per_grid
    def q_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last query position of each query block, ``(nQ, 1)`` each."""
        first, last = self._ends(self.q_len, self.block_q, self.shape[0], self.offset)
        return first[:, None], last[:, None]

    @_per_grid
    def kv_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last key index of each key block, ``(1, nKV)`` each."""
        first, last = self._ends(self.kv_len, self.block_kv, self.shape[1], 0)
        return first[None, :], last[None, :]

    @_per_grid
    def complete(self) -> torch.Tensor:
        """``(nQ, nKV)`` bool: the block lies wholly inside the sequences (only those can be FULL)."""
        (q_first, _), (kv_first, _) = self.q_range, self.kv_range
        return (q_first <= self.kv_len - self.block_q) & (kv_first <= self.kv_len - self.block_kv)  # q_first is offset by Skv - Sq

    @_per_grid
    def distance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Least and greatest ``q_pos - kv_idx`` over each block, ``(nQ, nKV)``; every value between occurs."""
        q_first, q_last = self.q_range
        kv_first, kv_last = self.kv_range
        return q_first - kv_last, q_last - kv_first


def classify(any_allowed: torch.Tensor, all_allowed: torch.Tensor, grid: Grid) -> torch.Tensor:
    """States from exact per-block facts: some pair allowed / every pair allowed (cut blocks not FULL)."""
    full = all_allowed & grid.complete
    return torch.where(full, FULL, any_allowed.to(torch.int8))  # a bool is EMPTY (0) or PARTIAL (1)


def either(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """States of ``a | b``: exact unless both are PARTIAL (or either UNKNOWN) there."""
    settled = torch.where(a == EMPTY, b, torch.where(b == EMPTY, a, UNKNOWN))
    return torch.where((a == FULL) | (b == FULL), FULL, settled).to(torch.int8)


def both(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """States of ``a & b``: exact unless both are PARTIAL (or either UNKNOWN) there."""
    settled = torch.where(a == FULL, b, torch.where(b == FULL, a, UNKNOWN))
    return torch.where((a == EMPTY) | (b == EMPTY), EMPTY, settled).to(torch.int8)


def refine(states: torch.Tensor, grid: Grid, allowed: MaskFn) -> torch.Tensor:
    """Replace UNKNOWN blocks by their exact state, evaluating ``allowed`` on those blocks' elements only.

    Finding them (``nonzero``) reads their number back to the host: a sync on CUDA, which is why
    patterns whose states are exact by construction skip this (``Pattern._exact_states``).
    """
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


def _ordered(tables: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each bool table ``(..., n)`` stacked in ``tables (T, ..., n)``: per row, the count ``(...)``
    and the columns ``(..., n)``, the selected ones first (ascending), then the others (ascending);
    int32, contiguous, one pair per table.

    The order of ``create_block_mask`` (a stable descending sort of 0/1), without a sort: an
    inclusive cumsum gives every column its slot (selected column ``j``: the selected ones up to
    it, minus 1; another: the row's count plus the unselected ones before it), a scatter puts it there.
    """
    n = tables.shape[-1]
    selected = tables.cumsum(-1)  # int64 (T, ..., n): selected columns up to and including j
    counts = selected[..., -1:]
    columns = torch.arange(n, device=tables.device, dtype=torch.int32)
    slots = torch.where(tables, selected - 1, counts + columns - selected)
    pairs = []
    for table in range(tables.shape[0]):  # separate tensors: each its own allocation, as FlexAttention gets them from torch
        order = torch.empty(slots.shape[1:], dtype=torch.int32, device=tables.device)
        pairs.append((counts[table, ..., 0].to(torch.int32), order.scatter_(-1, slots[table], columns.expand_as(order))))
    return pairs


def block_tables(states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The eight ``BlockMask`` tables of block states ``(B|1, H|1, nQ, nKV)``, int32, contiguous, each its own allocation.

    In order: ``kv_num_blocks (B, H, nQ)``, ``kv_indices (B, H, nQ, nKV)``, ``full_kv_num_blocks``,
    ``full_kv_indices`` (key side, the forward), then ``q_num_blocks (B, H, nKV)``, ``q_indices
    (B, H, nKV, nQ)``, ``full_q_num_blocks``, ``full_q_indices`` (query side, the backward).
    PARTIAL and UNKNOWN blocks go to the masked tables, FULL ones to the ``full_`` tables.
    Elementwise work, a cumsum and a scatter: no sort, no host sync, no data-dependent shape, so
    it compiles into one dynamic-shape graph (:func:`on_device`).
    """
    tables = torch.stack(((states == PARTIAL) | (states == UNKNOWN), states == FULL))  # (2, B|1, H|1, nQ, nKV)
    (kv_num, kv_indices), (full_kv_num, full_kv_indices) = _ordered(tables)
    (q_num, q_indices), (full_q_num, full_q_indices) = _ordered(tables.transpose(-2, -1))
    return kv_num, kv_indices, full_kv_num, full_kv_indices, q_num, q_indices, full_q_num, full_q_indices


def block_mask_from_tables(tables: tuple[torch.Tensor, ...], grid: Grid, mask_mod):
    """A FlexAttention ``BlockMask`` from :func:`block_tables`' eight tables (kept as they are, not copied)."""
    from torch.nn.attention.flex_attention import BlockMask

    kv_num, kv_indices, full_kv_num, full_kv_indices, q_num, q_indices, full_q_num, full_q_indices = tables
    return BlockMask(
        seq_lengths=(grid.q_len, grid.kv_len),
        kv_num_blocks=kv_num, kv_indices=kv_indices, full_kv_num_blocks=full_kv_num, full_kv_indices=full_kv_indices,
        q_num_blocks=q_num, q_indices=q_indices, full_q_num_blocks=full_q_num, full_q_indices=full_q_indices,
        BLOCK_SIZE=(grid.block_q, grid.block_kv), mask_mod=mask_mod,
    )  # fmt: skip


def block_mask_from_states(states: torch.Tensor, grid: Grid, mask_mod):
    """A FlexAttention ``BlockMask`` from block states ``(B|1, H|1, nQ, nKV)``.

    ``mask_mod(b, h, q_idx, kv_idx)`` is applied by the kernel inside PARTIAL blocks only; an
    UNKNOWN block left unrefined runs as PARTIAL (right, only slower). The tables
    (:func:`block_tables`, compiled on CUDA) equal, bit for bit, those of
    ``BlockMask.from_kv_blocks`` and ``create_block_mask`` for the same blocks.
    """
    assert states.dim() == 4, "states must be (B|1, H|1, nQ, nKV)"
    return block_mask_from_tables(on_device(block_tables, states.device)(states), grid, mask_mod)


def on_device(fn: Callable, device: torch.device) -> Callable:
    """``fn`` (tensors and ints in, tensors out) as it should run for tensors on ``device``.

    On CUDA, :func:`compiled` ``fn``: a new sequence length then costs a few fused kernels instead
    of ~50 launches of small eager ops (each ~10-30 us of launch and Python). On CPU ``fn`` itself
    (compiling would cost seconds for a gain of microseconds), and ``fn`` itself under an outer
    ``torch.compile`` / ``torch.export`` or a dispatch mode (``make_fx``, fake tensors), which
    trace it into their own graph.
    """
    if device.type == "cuda" and not torch.compiler.is_compiling() and not _dispatch_modes():
        return compiled(fn)
    return fn


# FailOnRecompileLimitHit (torch >= 2.6) is not a TorchDynamoException; fullgraph raises it at the recompile limit.
_DYNAMO_FAILURES = (torch._dynamo.exc.TorchDynamoException, getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", torch._dynamo.exc.TorchDynamoException))


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=True, fullgraph=True)``, called with grad mode off.

    ``dynamic=True`` makes tensor sizes and int arguments symbolic from the first compilation, so
    every later length reuses the graph (sizes 0 and 1 are still specialized: one more graph for a
    single-block dimension). Grad mode is part of Dynamo's guards; fixing it keeps one graph for
    callers inside and outside ``torch.no_grad()`` (nothing here has a gradient). Should Dynamo or
    Inductor fail on it (another torch version), it warns once and ``fn`` runs eagerly from then on:
    the same tables, only slower.
    """
    graph = torch.compile(fn, dynamic=True, fullgraph=True)

    @functools.wraps(fn)
    def run(*args):
        nonlocal graph
        with torch.no_grad():
            try:
                return graph(*args)
            except _DYNAMO_FAILURES as error:
                warnings.warn(f"attnkit.sparse: compiling {fn.__qualname__} failed, it runs eagerly (slower): {error}", stacklevel=2)
                graph = fn
                return fn(*args)

    return run
