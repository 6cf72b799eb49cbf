"""``sparse_attention()`` and the ``sparse`` backend of ``attnkit.ops.attention``.

The backend runs a ``BlockMask`` (from a pattern, a content-aware selection or the caller):
compiled FlexAttention on CUDA (forward and backward); on CPU, and for float64, the gathered
block-sparse path (``sparse/gathered.py``): FlexAttention's CPU kernel has no backward and its
eager form computes every score. Registered with ``register_backend`` and not offered to
``backend="auto"``: sparsity changes the result, so only a caller who asks for it gets it.
"""

from __future__ import annotations

import torch

from attnkit.errors import InvalidTypeError
from attnkit.ops import attention
from attnkit.ops.flex import flex_attention, flex_support
from attnkit.ops.options import AttentionOptions, _BlockMask
from attnkit.ops.registry import BACKENDS, register_backend
from attnkit.ops.spec import AttentionSpec
from attnkit.sparse.gathered import gathered_attention
from attnkit.sparse.patterns import Pattern
from attnkit.sparse.topk import ContentAware, select_blocks

__all__ = ["sparse_attention", "sparse_support", "sparse_run"]


def sparse_support(spec: AttentionSpec) -> str | None:
    """None if the ``sparse`` backend can run ``spec``, else why not."""
    if spec.mask != "block":
        return f"the sparse backend runs a BlockMask or sparsity pattern (mask=SlidingWindow(...)), got mask kind {spec.mask!r}"
    if spec.dropout_p > 0:
        return "the sparse backend has no dropout"
    if spec.device not in ("cpu", "cuda"):
        return f"the sparse backend runs on cpu or cuda, got device {spec.device!r}"
    if spec.device == "cuda" and spec.dtype != torch.float64:
        return flex_support(spec)
    return None


def _flex_runs(q: torch.Tensor) -> bool:
    return q.device.type == "cuda" and q.dtype != torch.float64


def sparse_run(q, k, v, options: AttentionOptions):
    """The backend's run: ``(out, lse | None)`` for a BlockMask in ``options.mask``."""
    if _flex_runs(q):
        return flex_attention(q, k, v, options)
    return gathered_attention(q, k, v, options.mask, scale=options.scale, return_lse=options.return_lse)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, *, scale: float | None = None,
                     return_lse: bool = False, block_size: int = 128):  # fmt: skip
    """Attention that computes only the blocks a sparsity pattern allows (forward and backward).

    Args:
        q: ``(B, Hq, Sq, D)``; k: ``(B, Hkv, Skv, D)`` with ``Hq % Hkv == 0`` (GQA); v: ``(B, Hkv, Skv, Dv)``.
        pattern: a static :class:`Pattern` (positions bottom-right aligned, ``Sq <= Skv``), a
            :class:`ContentAware` config (blocks chosen per head from q and k, its own block size),
            or a FlexAttention ``BlockMask``.
        scale: multiplies ``q k^T``; default ``1/sqrt(D)``.
        return_lse: also return the log-sum-exp ``(B, Hq, Sq)`` float32.
        block_size: tokens per block for a static pattern's BlockMask (FlexAttention's default 128).

    Returns:
        ``out (B, Hq, Sq, Dv)`` (and ``lse``); a query with no allowed key gets zeros and ``lse = -inf``.

    Example::

        out = sparse_attention(q, k, v, SlidingWindow(2048) | GlobalTokens(4))
        out = sparse_attention(q, k, v, ContentAware(block_size=128, density=0.2))
    """
    if isinstance(pattern, ContentAware):
        mask = select_blocks(q, k, pattern, scale=scale).block_mask()
    elif isinstance(pattern, Pattern):
        mask = pattern.block_mask(q.shape[2], k.shape[2], block_size=block_size, device=q.device)
    elif _BlockMask is not None and isinstance(pattern, _BlockMask):
        mask = pattern
    else:
        raise InvalidTypeError("pattern", "a sparsity Pattern, a ContentAware config or a FlexAttention BlockMask", pattern)
    return attention(q, k, v, mask=mask, scale=scale, return_lse=return_lse, backend="sparse")


def _register() -> None:
    if "sparse" not in BACKENDS:
        register_backend("sparse", sparse_support, sparse_run, summary="block-sparse: FlexAttention on CUDA, gathered blocks on CPU / float64")


_register()
