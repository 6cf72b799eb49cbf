"""Static sparsity patterns: small frozen objects composed with ``|`` and ``&``.

Every pattern answers two questions, one per level:

* element: ``allowed(q_pos, kv_idx)`` on broadcastable tensors — its ``mask_mod`` and ``to_dense``;
* block: the state (EMPTY / PARTIAL / FULL, ``sparse/blocks.py``) of every block pair, computed
  from closed-form facts about the block's ranges of positions, never from its elements.

The block answer gives the BlockMask, density and FLOPs of any length in O(S^2 / block^2).
Positions are bottom-right aligned like ``attention()``'s causal (query ``i`` is at ``i + Skv - Sq``).

Example::

    pattern = SlidingWindow(256) | GlobalTokens(4)      # causal window plus 4 sink tokens
    pattern.density(4096, block_size=128)                # fraction of blocks computed
    out = sparse_attention(q, k, v, pattern)
    print(pattern.picture(1024))
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Callable, ClassVar, Hashable

import torch

from attnkit.errors import InvalidTypeError, check_arg, fail
from attnkit.ops.cache import on_clear
from attnkit.sparse.blocks import (EMPTY, FULL, PARTIAL, Grid, MaskFn, block_mask_from_states, block_mask_from_tables, block_tables, both, classify,
                                   computed_elements, either, on_device, refine)

__all__ = ["Pattern", "Union", "Intersection", "Causal", "SlidingWindow", "Dilated", "GlobalTokens", "PrefixLM", "check_count"]

_PICTURE = {EMPTY: " ", PARTIAL: "░", FULL: "█"}


def check_count(value, parameter: str, minimum: int = 1, hint: str | None = None) -> None:
    """``value`` must be an int (not a bool) ``>= minimum``."""
    check_arg(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, parameter, f"an int >= {minimum}", value, hint)


def _lengths(q_len, kv_len) -> tuple[int, int]:
    kv_len = q_len if kv_len is None else kv_len
    check_count(q_len, "q_len")
    check_count(kv_len, "kv_len")
    check_arg(q_len <= kv_len, "q_len", f"at most kv_len={kv_len} (queries are the last q_len positions)", q_len)
    return q_len, kv_len


def _device(device) -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class Pattern:
    """Base of static patterns; subclasses are frozen dataclasses defining ``_allowed`` and ``_states``."""

    _exact_states: ClassVar[bool] = False
    """True when ``_states`` never returns UNKNOWN, so :func:`refine` (a host sync on CUDA) is skipped
    and, on CUDA, a new length's states and tables come from one compiled graph (``_exact_tables``)."""

    def _allowed(self, kv_len: int, device: torch.device) -> MaskFn:
        """``allowed(q_pos, kv_idx) -> bool`` for sequences of ``kv_len`` keys."""
        raise NotImplementedError

    def _states(self, grid: Grid) -> torch.Tensor:
        """``(nQ, nKV)`` int8 block states (UNKNOWN allowed; :meth:`block_states` refines them).

        Exact patterns take the tensors of :meth:`_state_inputs` as further arguments (and make them
        when not given): in a compiled graph, values read from ``self`` are constants that each
        new value would recompile.
        """
        raise NotImplementedError

    def _state_inputs(self, kv_len: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Tensors an exact pattern's ``_states`` reads that change with the sequence (none by default)."""
        return ()

    # composition ----------------------------------------------------------------------------
    def __or__(self, other: Pattern) -> Union:
        if not isinstance(other, Pattern):
            raise InvalidTypeError("other", "a sparsity Pattern (e.g. SlidingWindow(256) | GlobalTokens(4))", other)
        return Union(_flatten(Union, (self, other)))

    def __and__(self, other: Pattern) -> Intersection:
        if not isinstance(other, Pattern):
            raise InvalidTypeError("other", "a sparsity Pattern (e.g. Causal() & Dilated(4, causal=False))", other)
        return Intersection(_flatten(Intersection, (self, other)))

    # element level -----------------------------------------------------------------------------
    def mask_mod(self, q_len: int, kv_len: int | None = None, device=None) -> Callable:
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` for ``(q_len, kv_len)`` (True = attend)."""
        q_len, kv_len = _lengths(q_len, kv_len)
        allowed, offset = self._allowed(kv_len, _device(device)), kv_len - q_len

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed(q_idx + offset, kv_idx)

        return mask_mod

    def to_dense(self, q_len: int, kv_len: int | None = None, device=None) -> torch.Tensor:
        """The ``(q_len, kv_len)`` bool mask (True = attend); for tests and small pictures."""
        q_len, kv_len = _lengths(q_len, kv_len)
        device = _device(device)
        rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        return self._allowed(kv_len, device)(rows, torch.arange(kv_len, device=device)[None, :]).expand(q_len, kv_len)

    # block level -------------------------------------------------------------------------------
    def block_states(self, q_len: int, kv_len: int | None = None, *, block_size: int | tuple[int, int] = 128, device=None) -> torch.Tensor:
        """``(nQ, nKV)`` int8: EMPTY 0 / PARTIAL 1 / FULL 2 per block pair (cached per pattern, shape and device)."""
        q_len, kv_len = _lengths(q_len, kv_len)
        return _states_cached(self, q_len, kv_len, *_block_sizes(block_size), _device(device))

    def density(self, q_len: int, kv_len: int | None = None, *, block_size: int | tuple[int, int] = 128) -> float:
        """Fraction of block pairs computed (PARTIAL or FULL), as FlexAttention counts work."""
        return float((self.block_states(q_len, kv_len, block_size=block_size) != EMPTY).float().mean())

    def flops(self, q_len: int, kv_len: int | None = None, *, head_dim: int, batch: int = 1, heads: int = 1,
              block_size: int | tuple[int, int] = 128, backward: bool = False) -> int:  # fmt: skip
        """FLOPs a block-sparse kernel spends: ``4 * B * H * D`` per element of every computed block
        (the block's part inside the sequences); ``backward=True`` gives forward + backward (3.5x)."""
        check_count(head_dim, "head_dim")
        q_len, kv_len = _lengths(q_len, kv_len)
        grid = Grid(q_len, kv_len, *_block_sizes(block_size), torch.device("cpu"))
        elements = computed_elements(self.block_states(q_len, kv_len, block_size=block_size) != EMPTY, grid)
        return int(elements * 4 * batch * heads * head_dim * (3.5 if backward else 1.0))

    def block_mask(self, *shape: int, block_size: int | tuple[int, int] = 128, device=None):
        """A FlexAttention ``BlockMask`` built from the block states (never from the S x S mask).

        ``shape`` is ``(q_len, kv_len)`` or ``attention()``'s ``(batch, heads, q_len, kv_len)``; the mask
        is shared by every batch entry and head (its B and H are 1). Cached per (pattern, lengths,
        block size, device): a repeated call costs a dictionary lookup, a new length a few
        block-level tensor ops. On CUDA those are one compiled graph (``blocks.on_device``): the
        first call compiles it (seconds, once per pattern value; later lengths reuse it).
        """
        if len(shape) not in (2, 4):
            fail("shape", "(q_len, kv_len) or (batch, heads, q_len, kv_len)", shape)
        q_len, kv_len = _lengths(*shape[-2:])
        return _block_mask_cached(self, q_len, kv_len, *_block_sizes(block_size), _device(device))

    def picture(self, q_len: int = 1024, kv_len: int | None = None, *, block_size: int | None = None, max_blocks: int = 32) -> str:
        """Text picture of the block states (█ full, ░ partial, blank skipped); coarser blocks for long sequences."""
        q_len, kv_len = _lengths(q_len, kv_len)
        block_size = block_size or max(1, -(-max(q_len, kv_len) // max_blocks))
        states = self.block_states(q_len, kv_len, block_size=block_size)
        rows = ["".join(_PICTURE[int(s)] for s in row) for row in states.tolist()]
        head = f"{self!r}  Sq={q_len} Skv={kv_len} block={block_size} density={self.density(q_len, kv_len, block_size=block_size):.3f}"
        return "\n".join([head, *(f"|{row}|" for row in rows)])


def _flatten(kind: type, parts: tuple[Pattern, ...]) -> tuple[Pattern, ...]:
    flat: list[Pattern] = []
    for part in parts:
        flat.extend(part.parts if isinstance(part, kind) else (part,))
    return tuple(flat)


def _block_sizes(block_size) -> tuple[int, int]:
    sizes = (block_size, block_size) if isinstance(block_size, int) and not isinstance(block_size, bool) else block_size
    if not (isinstance(sizes, tuple) and len(sizes) == 2):
        fail("block_size", "an int >= 1 or a (block_q, block_kv) pair", block_size)
    for size in sizes:
        check_count(size, "block_size", hint="FlexAttention's default is 128.")
    return sizes


@functools.lru_cache(maxsize=256)
def _states_cached(pattern: Pattern, q_len: int, kv_len: int, block_q: int, block_kv: int, device: torch.device) -> torch.Tensor:
    grid = Grid(q_len, kv_len, block_q, block_kv, device)
    states = pattern._states(grid)
    return states if pattern._exact_states else refine(states, grid, pattern._allowed(kv_len, device))


@functools.lru_cache(maxsize=256)
def _block_mask_cached(pattern: Pattern, q_len: int, kv_len: int, block_q: int, block_kv: int, device: torch.device):
    # Not create_block_mask(mask_mod, ...): it evaluates the mask_mod on all Sq x Skv elements
    # (10-18 ms per call on an H100 after a 0.3-6 s compile, 128 GiB at 128k uncompiled). The block
    # states give kv_num_blocks / kv_indices (and the FULL-block tables) directly.
    grid, mask_mod = Grid(q_len, kv_len, block_q, block_kv, device), pattern.mask_mod(q_len, kv_len, device)
    if pattern._exact_states:  # states and tables in one graph (compiled on CUDA)
        inputs = pattern._state_inputs(kv_len, device)
        tables = on_device(_tables_of(_structure(pattern)), device)(pattern, q_len, kv_len, block_q, block_kv, device, inputs)
        return block_mask_from_tables(tables, grid, mask_mod)
    states = _states_cached(pattern, q_len, kv_len, block_q, block_kv, device)
    return block_mask_from_states(states[None, None], grid, mask_mod)


def _exact_tables(pattern: Pattern, q_len: int, kv_len: int, block_q: int, block_kv: int, device: torch.device,
                  inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """:func:`block_tables` of an exact pattern's states. Lengths are arguments (symbolic when
    compiled, so one graph serves every length); the pattern's own fields are guarded constants."""
    return block_tables(pattern._states(Grid(q_len, kv_len, block_q, block_kv, device), *inputs)[None, None])


def _structure(pattern: Pattern) -> Hashable:
    """The pattern's types, composition included (``(Union, (SlidingWindow, GlobalTokens))``); not its values."""
    parts = getattr(pattern, "parts", None)
    return (type(pattern), tuple(_structure(part) for part in parts)) if isinstance(parts, tuple) else type(pattern)


@functools.lru_cache(maxsize=256)
def _tables_of(structure: Hashable) -> Callable:
    """:func:`_exact_tables` with a code object of its own for each pattern structure.

    Dynamo keeps compiled graphs per code object, and refuses a ninth (its ``recompile_limit``, a hard
    error under ``fullgraph``): one shared function would fail at the ninth kind of pattern a process
    builds. Each structure compiles once (values such as the window are symbolic), into its own cache.
    """
    code = _exact_tables.__code__.replace()  # an equal but distinct code object
    copy = types.FunctionType(code, _exact_tables.__globals__, _exact_tables.__name__, _exact_tables.__defaults__, _exact_tables.__closure__)
    return functools.update_wrapper(copy, _exact_tables)


on_clear(_states_cached.cache_clear)
on_clear(_block_mask_cached.cache_clear)


@dataclass(frozen=True, repr=False)
class Union(Pattern):
    """Attend where any part allows (``a | b``)."""

    parts: tuple[Pattern, ...]

    def _allowed(self, kv_len, device):
        first, *rest = [part._allowed(kv_len, device) for part in self.parts]

        def allowed(q, kv):  # a plain loop: FlexAttention's compiler traces it into the kernel
            result = first(q, kv)
            for fn in rest:
                result = result | fn(q, kv)
            return result

        return allowed

    def _states(self, grid):
        return functools.reduce(either, (part._states(grid) for part in self.parts))

    def __repr__(self) -> str:
        return "(" + " | ".join(map(repr, self.parts)) + ")"


@dataclass(frozen=True, repr=False)
class Intersection(Pattern):
    """Attend where every part allows (``a & b``)."""

    parts: tuple[Pattern, ...]

    def _allowed(self, kv_len, device):
        first, *rest = [part._allowed(kv_len, device) for part in self.parts]

        def allowed(q, kv):
            result = first(q, kv)
            for fn in rest:
                result = result & fn(q, kv)
            return result

        return allowed

    def _states(self, grid):
        return functools.reduce(both, (part._states(grid) for part in self.parts))

    def __repr__(self) -> str:
        return "(" + " & ".join(map(repr, self.parts)) + ")"


@dataclass(frozen=True)
class Causal(Pattern):
    """Query at position ``p`` sees keys ``j <= p`` (bottom-right aligned, as ``attention(causal=True)``)."""

    _exact_states = True

    def _allowed(self, kv_len, device):
        return lambda q, kv: kv <= q

    def _states(self, grid):
        least, most = grid.distance
        return classify(most >= 0, least >= 0, grid)


def _band(grid: Grid, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: some / every ``q_pos - kv_idx`` lies in ``[low, high]``."""
    least, most = grid.distance
    return (most >= low) & (least <= high), (least >= low) & (most <= high)


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Each query sees its ``window`` most recent keys, itself included (``0 <= p - j < window``);
    with ``causal=False`` also the ``window - 1`` keys after it (``|p - j| < window``)."""

    _exact_states = True

    window: int
    """Keys per query on the causal side, >= 1."""
    causal: bool = True

    def __post_init__(self):
        check_count(self.window, "window", hint="A window of 1 keeps only the diagonal.")
        check_arg(isinstance(self.causal, bool), "causal", "a bool", self.causal)

    @property
    def _range(self) -> tuple[int, int]:
        return (0 if self.causal else 1 - self.window), self.window - 1

    def _allowed(self, kv_len, device):
        low, high = self._range
        return lambda q, kv: ((q - kv) >= low) & ((q - kv) <= high)

    def _states(self, grid):
        return classify(*_band(grid, *self._range), grid)


@dataclass(frozen=True)
class Dilated(Pattern):
    """Keys at distances that are multiples of ``stride`` (Sparse Transformer's strided heads):
    ``(p - j) % stride == 0``, at most ``window`` of them per side (None = no limit)."""

    _exact_states = True

    stride: int
    """Distance between attended keys, >= 1 (1 = a plain window)."""
    window: int | None = None
    """Keys per query on the causal side (itself included); None = the whole sequence."""
    causal: bool = True

    def __post_init__(self):
        check_count(self.stride, "stride")
        if self.window is not None:
            check_count(self.window, "window", hint="None means no limit.")
        check_arg(isinstance(self.causal, bool), "causal", "a bool", self.causal)

    def _range(self, kv_len: int) -> tuple[int, int]:
        high = (self.window - 1) * self.stride if self.window is not None else 2 * kv_len
        return (0 if self.causal else -high), high

    def _allowed(self, kv_len, device):
        low, high = self._range(kv_len)
        stride = self.stride
        return lambda q, kv: ((q - kv) >= low) & ((q - kv) <= high) & (torch.remainder(q - kv, stride) == 0)

    def _states(self, grid):
        low, high = self._range(grid.kv_len)
        least, most = grid.distance
        first, last = torch.clamp(least, min=low), torch.clamp(most, max=high)
        last_multiple = torch.div(last, self.stride, rounding_mode="floor") * self.stride
        some = (first <= last) & (last_multiple >= first)
        every = (least >= low) & (most <= high) & ((self.stride == 1) | ((least == most) & (torch.remainder(least, self.stride) == 0)))
        return classify(some, every, grid)


@dataclass(frozen=True)
class GlobalTokens(Pattern):
    """The first ``count`` positions are global (Longformer): every query sees them; with
    ``causal=False`` they also see every key. Causal, they are attention sinks (``j < count and j <= p``)."""

    _exact_states = True

    count: int
    """Number of global positions, >= 1."""
    causal: bool = True

    def __post_init__(self):
        check_count(self.count, "count")
        check_arg(isinstance(self.causal, bool), "causal", "a bool", self.causal)

    def _allowed(self, kv_len, device):
        count = self.count
        if self.causal:
            return lambda q, kv: (kv < count) & (kv <= q)
        return lambda q, kv: (kv < count) | (q < count)

    def _states(self, grid):
        (q_first, q_last), (kv_first, kv_last) = grid.q_range, grid.kv_range
        if self.causal:
            return classify((kv_first < self.count) & (kv_first <= q_last), (kv_last < self.count) & (kv_last <= q_first), grid)
        return classify((kv_first < self.count) | (q_first < self.count), (kv_last < self.count) | (q_last < self.count), grid)


@dataclass(frozen=True)
class PrefixLM(Pattern):
    """Causal, except that the first ``prefix`` positions are seen by every query (bidirectional prefix)."""

    _exact_states = True

    prefix: int
    """Length of the bidirectional prefix, >= 1."""

    def __post_init__(self):
        check_count(self.prefix, "prefix")

    def _allowed(self, kv_len, device):
        prefix = self.prefix
        return lambda q, kv: (kv < prefix) | (kv <= q)

    def _states(self, grid):
        (q_first, q_last), (kv_first, kv_last) = grid.q_range, grid.kv_range
        return classify((kv_first < self.prefix) | (kv_first <= q_last), (kv_last < self.prefix) | (kv_last <= q_first), grid)
