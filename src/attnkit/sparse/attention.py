"""``sparse_attention()`` and the ``sparse`` backend of ``attnkit.ops.attention``.

The backend runs a ``BlockMask`` (from a pattern, a content-aware selection or the caller):
compiled FlexAttention on CUDA (forward and backward); on CPU, and for float64, the gathered
block-sparse path (``sparse/gathered.py``): FlexAttention's CPU kernel has no backward and its
eager form computes every score. Registered with ``register_backend`` and not offered to
``backend="auto"``: sparsity changes the result, so only a caller who asks for it gets it.

``sparse_attention`` sends ``Documents`` of one length alone (no key_mask) on CUDA half precision
to ``sparse/dense_pieces.py`` instead: one batched dense cuDNN/flash call, which beats FlexAttention
when the documents are long enough (``_PIECES_MIN_DOCUMENT``). Sliding windows stay on
FlexAttention (as dense pieces they were no faster; numbers in dense_pieces.py), and so do documents
of unequal lengths: FlashAttention-2's own window / variable-length kernel (``window_size_left``,
``cum_seq``) was slower than Flex on an H200 from 32k tokens
(``benchmarks/results/sparse/sparse-nvidia-h200-2026-11-27-session4-run7-flash-window-varlen.json``).
"""

from __future__ import annotations

import torch

from attnkit.errors import InvalidTypeError, UnsupportedError, check_arg
from attnkit.ops import attention
from attnkit.ops.flex import flex_attention, flex_support
from attnkit.ops.options import AttentionOptions, _BlockMask
from attnkit.ops.registry import BACKENDS, register_backend
from attnkit.ops.spec import AttentionSpec
from attnkit.sparse.blocks import EMPTY, FULL, PARTIAL, Grid, block_mask_from_states
from attnkit.sparse.dense_pieces import dense_pieces_attention, dense_pieces_support
from attnkit.sparse.documents import Documents
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


# Shortest document (tokens) sent to the dense pieces on CUDA: they add no work, but below 128
# tokens a document fills little of a kernel tile (an estimate; benchmarks/sparse/run.py times
# L = S/16, 512 tokens and up, where the pieces are the faster path).
_PIECES_MIN_DOCUMENT = 128


def _dense_pieces_run(q: torch.Tensor, k: torch.Tensor, pattern, key_mask) -> bool:
    """Whether ``sparse_attention`` sends this call to the dense pieces (CUDA half precision, see above)."""
    if key_mask is not None or not (q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    if not isinstance(pattern, Documents) or dense_pieces_support(pattern, q, k) is not None:
        return False
    return pattern.lengths[0] >= _PIECES_MIN_DOCUMENT


def sparse_run(q, k, v, options: AttentionOptions):
    """The backend's run: ``(out, lse | None)`` for a BlockMask in ``options.mask`` (or the dense
    pieces, for the pattern it came from where ``sparse_attention`` would send it there)."""
    pattern = options.pattern
    if pattern is not None and options.q_start is None and options.kv_start is None and _dense_pieces_run(q, k, pattern, None):
        result = dense_pieces_attention(q, k, v, pattern, scale=options.scale, return_lse=options.return_lse)
        return result if options.return_lse else (result, None)
    if _flex_runs(q):
        return flex_attention(q, k, v, options)
    return gathered_attention(q, k, v, options.mask, scale=options.scale, return_lse=options.return_lse)


def _with_key_mask(states: torch.Tensor, grid: Grid, mask_mod, key_mask: torch.Tensor):
    """The BlockMask of ``states (B|1, H|1, nQ, nKV)`` restricted to the keys ``key_mask (B, Skv)`` keeps.

    Block level: a key block with no kept key becomes EMPTY, a FULL one with a dropped key PARTIAL;
    element level: the mask_mod also reads ``key_mask[b, kv_idx]``.
    """
    pad = grid.shape[1] * grid.block_kv - grid.kv_len
    per_block = torch.nn.functional.pad(key_mask, (0, pad)).view(key_mask.shape[0], 1, 1, grid.shape[1], grid.block_kv)
    any_kept, all_kept = per_block.any(-1), per_block.all(-1)  # (B, 1, 1, nKV)
    states = torch.where(~any_kept, EMPTY, torch.where((states == FULL) & ~all_kept, PARTIAL, states)).to(torch.int8)

    def masked(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx) & key_mask[b, kv_idx]

    return block_mask_from_states(states, grid, masked)


def _block_mask(q: torch.Tensor, k: torch.Tensor, pattern, scale, block_size: int, key_mask: torch.Tensor | None):
    if isinstance(pattern, ContentAware):
        selection = select_blocks(q, k, pattern, scale=scale)
        if key_mask is None:
            return selection.block_mask()
        grid = selection.grid
        states = torch.where(selection.blocks, selection.base_states, EMPTY)
        return _with_key_mask(states, grid, pattern.base.mask_mod(grid.q_len, grid.kv_len, grid.device), key_mask)
    if isinstance(pattern, Pattern):
        seq_q, seq_kv = q.shape[2], k.shape[2]
        if key_mask is None:
            return pattern.block_mask(seq_q, seq_kv, block_size=block_size, device=q.device)
        grid = Grid(seq_q, seq_kv, block_size, block_size, q.device)
        states = pattern.block_states(seq_q, seq_kv, block_size=block_size, device=q.device)[None, None]
        return _with_key_mask(states, grid, pattern.mask_mod(seq_q, seq_kv, q.device), key_mask)
    if _BlockMask is not None and isinstance(pattern, _BlockMask):
        if key_mask is not None:
            raise UnsupportedError("sparse_attention: key_mask with a ready-made BlockMask; pass the Pattern instead, "
                                   "or build the padding into the BlockMask's mask_mod.")
        return pattern
    raise InvalidTypeError("pattern", "a sparsity Pattern, a ContentAware config or a FlexAttention BlockMask", pattern)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, *, scale: float | None = None,
                     return_lse: bool = False, block_size: int = 128, key_mask: torch.Tensor | None = None):  # fmt: skip
    """Attention that computes only the blocks a sparsity pattern allows (forward and backward).

    Args:
        q: ``(B, Hq, Sq, D)``; k: ``(B, Hkv, Skv, D)`` with ``Hq % Hkv == 0`` (GQA); v: ``(B, Hkv, Skv, Dv)``.
        pattern: a static :class:`Pattern` (positions bottom-right aligned, ``Sq <= Skv``), a
            :class:`ContentAware` config (blocks chosen per head from q and k, its own block size),
            or a FlexAttention ``BlockMask``.
        scale: multiplies ``q k^T``; default ``1/sqrt(D)``.
        return_lse: also return the log-sum-exp ``(B, Hq, Sq)`` float32.
        block_size: tokens per block for a static pattern's BlockMask (FlexAttention's default 128).
        key_mask: ``(B, Skv)`` bool, True = the key may be attended (padding: False), ANDed with the
            pattern; key blocks with no kept key are skipped.

    On CUDA (float16/bfloat16) ``Documents`` of one length >= 128 with no ``key_mask`` run as one
    batched dense kernel call (``dense_pieces_attention``).

    Returns:
        ``out (B, Hq, Sq, Dv)`` (and ``lse``); a query with no allowed key gets zeros and ``lse = -inf``.

    Example::

        out = sparse_attention(q, k, v, SlidingWindow(2048) | GlobalTokens(4))
        out = sparse_attention(q, k, v, ContentAware(block_size=128, density=0.2), key_mask=~padding)
    """
    if key_mask is not None:
        ok = (isinstance(key_mask, torch.Tensor) and key_mask.dtype == torch.bool
              and tuple(key_mask.shape) == (k.shape[0], k.shape[2]) and key_mask.device == k.device)
        check_arg(ok, "key_mask", f"a bool tensor (B, Skv)={(k.shape[0], k.shape[2])} on {k.device}, True = attend", key_mask)
    if _dense_pieces_run(q, k, pattern, key_mask):
        return dense_pieces_attention(q, k, v, pattern, scale=scale, return_lse=return_lse)
    mask = _block_mask(q, k, pattern, scale, block_size, key_mask)
    return attention(q, k, v, mask=mask, scale=scale, return_lse=return_lse, backend="sparse")


def _register() -> None:
    if "sparse" not in BACKENDS:
        register_backend("sparse", sparse_support, sparse_run, summary="block-sparse: FlexAttention on CUDA, gathered blocks on CPU / float64")


_register()
