"""Content-aware sparsity: per-head key-block selection from mean-pooled queries and keys.

For every batch entry, head and query block, the estimator scores each key block by
``mean(q_block) . mean(k_block) * scale + log(keys in the block)`` — the log-mass the block would
carry if all its keys scored like their mean — and keeps, within a static ``base`` pattern
(causal by default):

* ``topk``: the ``topk`` best key blocks per query block;
* ``density``: the best ``ceil(density * n)`` of the ``n`` key blocks the base allows in that row;
* ``mass``: the fewest blocks whose estimated softmax mass reaches ``mass`` (adapts per head and row).

Sink blocks (the first ``sink_blocks``) and local blocks (the query block's own diagonal and
``local_blocks - 1`` before it) are always kept and count towards ``topk``/``density``.
The estimator costs ``O(B * H * (S / block)^2 * D)``; the selection is not differentiated, the
attention over the selected blocks is (forward and backward).

Example::

    config = ContentAware(block_size=64, mass=0.95)
    selection = select_blocks(q, k, config)
    selection.density                                  # fraction of blocks computed
    out = sparse_attention(q, k, v, config)            # selection + block-sparse attention
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attnkit.errors import check_arg, check_type
from attnkit.sparse.blocks import EMPTY, Grid, block_mask_from_states
from attnkit.sparse.patterns import Causal, Pattern, check_count

__all__ = ["ContentAware", "Selection", "select_blocks", "estimated_cost"]


@dataclass(frozen=True)
class ContentAware:
    """How to choose key blocks from the content; exactly one of ``topk``, ``density``, ``mass``."""

    block_size: int = 64
    """Tokens per query and key block (the selection's and the BlockMask's granularity)."""
    topk: int | None = None
    """Key blocks kept per query block (sink and local blocks included)."""
    density: float | None = None
    """In (0, 1]: fraction of the base pattern's key blocks kept per query block (rounded up)."""
    mass: float | None = None
    """In (0, 1]: keep the fewest blocks whose estimated softmax mass reaches it."""
    sink_blocks: int = 1
    """Leading key blocks always kept (attention sinks); 0 for none."""
    local_blocks: int = 1
    """Key blocks on and just before the diagonal always kept; >= 1 (the diagonal holds each query's own key)."""
    base: Pattern = field(default_factory=Causal)
    """The static pattern the selection refines; its mask applies inside the kept blocks."""

    def __post_init__(self):
        check_count(self.block_size, "block_size", hint="FlexAttention's default is 128; 64 suits short sequences.")
        chosen = [name for name in ("topk", "density", "mass") if getattr(self, name) is not None]
        check_arg(len(chosen) == 1, "topk/density/mass", "exactly one of them", chosen or None, "E.g. ContentAware(mass=0.95).")
        if self.topk is not None:
            check_count(self.topk, "topk")
        for name in ("density", "mass"):
            value = getattr(self, name)
            if value is not None:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
                check_arg(ok, name, "a number in (0, 1]", value)
        check_count(self.sink_blocks, "sink_blocks", minimum=0)
        check_count(self.local_blocks, "local_blocks")
        check_type(self.base, Pattern, "base")


@dataclass(frozen=True, eq=False)
class Selection:
    """The key blocks chosen per batch entry, head and query block."""

    blocks: torch.Tensor
    """``(B, H, nQ, nKV)`` bool: computed blocks (within the base pattern)."""
    estimated_mass: torch.Tensor
    """``(B, H, nQ)`` float32: the estimator's softmax mass of the kept blocks."""
    base_states: torch.Tensor
    """``(nQ, nKV)`` int8 states of the base pattern."""
    grid: Grid
    base: Pattern

    @property
    def density(self) -> float:
        """Fraction of all block pairs computed."""
        return float(self.blocks.float().mean())

    @property
    def kept(self) -> float:
        """Fraction of the base pattern's blocks computed."""
        return float(self.blocks.sum() / ((self.base_states != EMPTY).sum() * self.blocks.shape[0] * self.blocks.shape[1]))

    def block_mask(self):
        """The FlexAttention ``BlockMask`` ``(B, H, Sq, Skv)``: kept blocks, each in its base state."""
        states = torch.where(self.blocks, self.base_states, EMPTY).to(torch.int8)
        grid = self.grid
        # The base's cached BlockMask lends its mask_mod: one function object per shape, so compiled
        # FlexAttention sees the same mask_mod on every call and never recompiles for a new selection.
        base = self.base.block_mask(grid.q_len, grid.kv_len, block_size=(grid.block_q, grid.block_kv), device=grid.device)
        return block_mask_from_states(states, grid, base.mask_mod)


def _pool(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over blocks of the sequence dim: ``(B, H, n, D)`` float32 and the tokens per block ``(n,)``."""
    length = x.shape[2]
    n = -(-length // block)
    sums = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block - length)).view(*x.shape[:2], n, block, -1).sum(3)
    counts = torch.clamp(length - torch.arange(n, device=x.device) * block, max=block).float()
    return sums / counts[:, None], counts


@torch.no_grad()
def select_blocks(q: torch.Tensor, k: torch.Tensor, config: ContentAware, *, scale: float | None = None) -> Selection:
    """Choose key blocks per batch entry, head and query block (see the module docstring).

    Args:
        q: ``(B, Hq, Sq, D)``; k: ``(B, Hkv, Skv, D)`` with ``Hq % Hkv == 0``.
        config: a :class:`ContentAware`.
        scale: the attention's scale; default ``1/sqrt(D)``.

    Returns:
        A :class:`Selection`; ``selection.block_mask()`` runs it.
    """
    check_type(config, ContentAware, "config")
    check_type(q, torch.Tensor, "q")
    check_type(k, torch.Tensor, "k")
    check_arg(q.dim() == 4 and k.dim() == 4 and q.shape[1] % k.shape[1] == 0, "q, k", "(B, Hq, Sq, D) and (B, Hkv, Skv, D) with Hq % Hkv == 0", (tuple(q.shape), tuple(k.shape)))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    seq_q, seq_kv, block = q.shape[2], k.shape[2], config.block_size
    grid = Grid(seq_q, seq_kv, block, block, q.device)
    base_states = config.base.block_states(seq_q, seq_kv, block_size=block, device=q.device)
    allowed = base_states != EMPTY  # (nQ, nKV)

    pooled_q, _ = _pool(q, block)
    pooled_k, counts = _pool(k, block)
    pooled_k = pooled_k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (pooled_q @ pooled_k.transpose(-2, -1)) * scale + counts.log()  # (B, H, nQ, nKV)
    scores = scores.masked_fill(~allowed, float("-inf"))
    estimate = torch.softmax(scores.masked_fill(~allowed.any(-1, keepdim=True), 0.0), -1).masked_fill(~allowed, 0.0)

    (q_first, q_last), (kv_first, _) = grid.q_range, grid.kv_range
    column = kv_first // block  # (1, nKV) key block index
    local = (column <= q_last // block) & (column > q_first // block - config.local_blocks)
    forced = (local | (column < config.sink_blocks)) & allowed  # (nQ, nKV)

    # Rank: forced blocks first, then by estimated mass; keep a prefix of the ranking per row.
    order = torch.argsort(torch.where(forced, float("inf"), scores), dim=-1, descending=True, stable=True)
    ranked_mass = estimate.gather(-1, order)
    n_forced = forced.sum(-1, keepdim=True)  # (nQ, 1)
    if config.mass is not None:
        before = ranked_mass.cumsum(-1) - ranked_mass  # mass of the blocks ranked ahead
        keep_ranked = before < config.mass - 1e-6
    else:
        ranks = torch.arange(base_states.shape[1], device=q.device)
        if config.topk is not None:
            quota = torch.full_like(n_forced, config.topk)
        else:
            quota = torch.ceil(allowed.sum(-1, keepdim=True) * config.density).long()
        keep_ranked = ranks < torch.maximum(quota, n_forced)
    keep_ranked = (keep_ranked | (torch.arange(base_states.shape[1], device=q.device) < n_forced)).expand_as(order)
    blocks = torch.zeros_like(keep_ranked).scatter(-1, order, keep_ranked) & allowed
    kept_mass = (estimate * blocks).sum(-1)
    return Selection(blocks, kept_mass.float(), base_states.clone(), grid, config.base)  # the pattern's cache keeps the original


def estimated_cost(seq_q: int, seq_kv: int, head_dim: int, config: ContentAware, *, batch: int = 1, heads: int = 1) -> int:
    """FLOPs of the estimator's pooled scores (``2 * B * H * nQ * nKV * D``); pooling adds ``O(S * D)``."""
    return 2 * batch * heads * math.ceil(seq_q / config.block_size) * math.ceil(seq_kv / config.block_size) * head_dim
