"""What a sparsity pattern saves at one attention's shape: block density and FLOPs against dense.

The baseline is the dense kernel the attention runs today: causal attention computes the causal
blocks (density ~0.5, as FlexAttention and the block-skipping dense kernels count it), other
attention every element. A :class:`~attnkit.sparse.ContentAware` selection keeps a number of blocks
per query block that does not depend on the content for ``topk`` and ``density`` (sink and local
blocks included), so its FLOPs are exact before any data is seen; ``mass`` depends on the data and
is refused here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from attnkit.errors import UnsupportedError
from attnkit.sparse.blocks import EMPTY, Grid, computed_elements
from attnkit.sparse.patterns import Causal, Pattern
from attnkit.sparse.topk import ContentAware, select_blocks

__all__ = ["SiteSparsity", "site_sparsity"]


@dataclass(frozen=True)
class SiteSparsity:
    """One attention under one pattern."""

    name: str
    pattern: str
    batch: int
    heads: int
    seq_q: int
    seq_kv: int
    head_dim: int
    causal: bool
    block_size: int
    density: float
    """Fraction of all ``(query block, key block)`` pairs computed."""
    dense_density: float
    """The same for the dense baseline (causal blocks for causal attention, else 1)."""
    flops: int
    """Forward FLOPs of the block-sparse kernel: ``4 * B * H * D`` per computed score element."""
    dense_flops: int

    @property
    def saved(self) -> float:
        """Fraction of the dense baseline's attention FLOPs skipped."""
        return 1.0 - self.flops / self.dense_flops

    def to_json(self) -> dict:
        return {**asdict(self), "saved": self.saved}


def _computed(pattern, seq_q: int, seq_kv: int, block_size: int) -> torch.Tensor:
    """``(nQ, nKV)`` bool: blocks the pattern computes (for content-aware: a count-exact stand-in selection)."""
    if isinstance(pattern, ContentAware):
        if pattern.mass is not None:
            raise UnsupportedError("ContentAware(mass=...) keeps a data-dependent number of blocks; its density is known "
                                   "only on real inputs (sparse.select_blocks). Use topk= or density= here.")
        # Per row, topk/density keep min(allowed, max(quota, forced)) blocks whatever the scores: zeros suffice.
        q, k = torch.zeros(1, 1, seq_q, 1), torch.zeros(1, 1, seq_kv, 1)
        return select_blocks(q, k, pattern).blocks[0, 0]
    return pattern.block_states(seq_q, seq_kv, block_size=block_size) != EMPTY


def site_sparsity(name: str, pattern: Pattern | ContentAware, *, batch: int, heads: int, seq_q: int, seq_kv: int,
                  head_dim: int, causal: bool, block_size: int = 128) -> SiteSparsity:  # fmt: skip
    """Density and FLOPs of ``pattern`` at one attention's shape, beside its dense baseline.

    Example::

        site = site_sparsity("layers.0.self_attn", SlidingWindow(2048), batch=1, heads=32, seq_q=32768,
                             seq_kv=32768, head_dim=128, causal=True)
        site.density, site.saved     # ~0.064, ~0.87
    """
    block = pattern.block_size if isinstance(pattern, ContentAware) else block_size
    grid = Grid(seq_q, seq_kv, block, block, torch.device("cpu"))
    computed = _computed(pattern, seq_q, seq_kv, block)
    per_element = 4 * batch * heads * head_dim
    if causal:
        dense = Causal().block_states(seq_q, seq_kv, block_size=block) != EMPTY
        dense_density, dense_elements = float(dense.float().mean()), computed_elements(dense, grid)
    else:
        dense_density, dense_elements = 1.0, seq_q * seq_kv
    return SiteSparsity(name, repr(pattern), batch, heads, seq_q, seq_kv, head_dim, causal, block,
                        float(computed.float().mean()), dense_density, computed_elements(computed, grid) * per_element,
                        dense_elements * per_element)  # fmt: skip
