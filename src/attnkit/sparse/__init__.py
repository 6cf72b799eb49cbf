"""Sparse attention that skips work: static patterns, content-aware block selection, the op.

Patterns describe themselves per block (EMPTY / PARTIAL / FULL), so their FlexAttention
``BlockMask``, density and FLOPs cost ``O(S^2 / block^2)``, never ``O(S^2)``. Importing this
package registers the ``sparse`` backend of ``attnkit.ops.attention`` (not used by ``auto``).

Example::

    from attnkit.sparse import SlidingWindow, GlobalTokens, ContentAware, sparse_attention
    out = sparse_attention(q, k, v, SlidingWindow(2048) | GlobalTokens(4))
    out = attention(q, k, v, mask=SlidingWindow(2048), backend="sparse")
    out = sparse_attention(q, k, v, ContentAware(block_size=128, mass=0.95))
"""

from attnkit.sparse.attention import sparse_attention, sparse_run, sparse_support
from attnkit.sparse.bigbird import BigBird, RandomBlocks
from attnkit.sparse.blocks import EMPTY, FULL, PARTIAL
from attnkit.sparse.documents import Documents
from attnkit.sparse.gathered import gathered_attention
from attnkit.sparse.needle import NeedleResult, NeedleTask, needle_retrieval, needle_task
from attnkit.sparse.patterns import Causal, Dilated, GlobalTokens, Intersection, Pattern, PrefixLM, SlidingWindow, Union
from attnkit.sparse.report import SiteSparsity, site_sparsity
from attnkit.sparse.topk import ContentAware, Selection, estimated_cost, select_blocks

__all__ = [
    # the op
    "sparse_attention",
    "gathered_attention",
    "sparse_run",
    "sparse_support",
    # static patterns
    "Pattern",
    "Causal",
    "SlidingWindow",
    "Dilated",
    "GlobalTokens",
    "PrefixLM",
    "Documents",
    "RandomBlocks",
    "BigBird",
    "Union",
    "Intersection",
    # block states
    "EMPTY",
    "PARTIAL",
    "FULL",
    # content-aware
    "ContentAware",
    "Selection",
    "select_blocks",
    "estimated_cost",
    # what a pattern saves, and whether it keeps what matters
    "site_sparsity",
    "SiteSparsity",
    "needle_retrieval",
    "needle_task",
    "NeedleTask",
    "NeedleResult",
]
