"""The `flex` backend: FlexAttention with the caller's ``BlockMask``, or one built from ``causal`` and a bool mask.

Block masks built here are cached: per sequence lengths and causal offset, and per mask object
(``ops/cache.py``), so the layers of a model that share a padding mask build its block mask once.

Compiled on CUDA (eager FlexAttention materializes the scores and exists for debugging);
eager on CPU, where compiling costs more than it saves at test sizes. Additive masks enter
as a ``score_mod``. The log-sum-exp comes from ``return_lse``.
"""

from __future__ import annotations

import functools

import torch

from attnkit.ops.cache import on_clear, per_mask
from attnkit.ops.options import AttentionOptions
from attnkit.ops.spec import AttentionSpec

__all__ = ["flex_attention", "flex_support"]

try:
    from torch.nn.attention import flex_attention as _flex
except ImportError:  # torch < 2.5; flex_support then says so and nothing else here runs
    _flex = None

# torch >= 2.9 deprecates return_lse for return_aux=AuxRequest(lse=True).
_LSE = {"return_aux": _flex.AuxRequest(lse=True)} if hasattr(_flex, "AuxRequest") else {"return_lse": True}
_TORCH = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def flex_support(spec: AttentionSpec) -> str | None:
    if _flex is None:
        return f"FlexAttention needs torch >= 2.5, got {torch.__version__}"
    if spec.dropout_p > 0:
        return "FlexAttention has no dropout"
    if spec.mask_requires_grad:
        return "flex here gives the additive mask no gradient"
    if spec.device == "cpu":
        return "FlexAttention has no backward on CPU" if spec.requires_grad else None
    if spec.device != "cuda":
        return f"flex runs on cpu or cuda, got device {spec.device!r}"
    if spec.dtype == torch.float64:
        return "flex on CUDA needs float16/bfloat16/float32, got float64"
    if min(spec.head_dim, spec.head_dim_v) < 16:
        return f"flex on CUDA needs head dims >= 16, got D={spec.head_dim}, Dv={spec.head_dim_v}"
    if _TORCH < (2, 6) and spec.head_dim != spec.head_dim_v:
        return f"flex on CUDA with torch {torch.__version__} needs D == Dv, got D={spec.head_dim}, Dv={spec.head_dim_v}"
    powers_of_two = all(d & (d - 1) == 0 for d in (spec.head_dim, spec.head_dim_v))
    if _TORCH < (2, 7) and not powers_of_two:
        return f"flex on CUDA with torch {torch.__version__} needs power-of-two head dims, got D={spec.head_dim}, Dv={spec.head_dim_v}"
    return None


@functools.cache  # not cleared by clear_caches(): recompiling gains nothing
def _compiled_flex():
    # Static shapes: the fastest kernels, one compile per shape (dynamo's recompile limit,
    # default 8, then falls back to eager; raise torch._dynamo.config.recompile_limit for more).
    return torch.compile(_flex.flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _causal_block_mask(seq_q: int, seq_kv: int, offset: int, device: str):
    """Causal block mask (key ``j <= i + offset``), shared across batch and heads (cached: building it costs a kernel)."""

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    return _flex.create_block_mask(causal, None, None, seq_q, seq_kv, device=device)


on_clear(_causal_block_mask.cache_clear)


def _tensor_block_mask(allowed: torch.Tensor, causal: bool, offset: int, shape: tuple[int, int, int, int]):
    """Block mask from a bool mask broadcastable to ``shape = (B, Hq, Sq, Skv)``, ANDed with causal."""
    batch, heads, seq_q, seq_kv = shape
    allowed = allowed.reshape((1,) * (4 - allowed.dim()) + tuple(allowed.shape))
    mask_batch = batch if allowed.shape[0] > 1 else None
    mask_heads = heads if allowed.shape[1] > 1 else None
    full = allowed.expand(mask_batch or 1, mask_heads or 1, seq_q, seq_kv)

    def from_tensor(b, h, q_idx, kv_idx):
        keep = full[b if mask_batch else 0, h if mask_heads else 0, q_idx, kv_idx]
        return keep & (kv_idx <= q_idx + offset) if causal else keep

    return _flex.create_block_mask(from_tensor, mask_batch, mask_heads, seq_q, seq_kv, device=allowed.device)


def flex_attention(q, k, v, options: AttentionOptions):
    """FlexAttention; shapes as in ``attention()``, returns ``(out, lse float32 | None)``."""
    assert options.dropout_p == 0 and options.dropout_mask is None, "flex_support excludes dropout"
    mask, causal = options.mask, options.causal
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    offset = options.causal_offset(shape[2], shape[3])
    score_mod, block_mask = None, None
    if mask is not None and not isinstance(mask, torch.Tensor):
        block_mask = mask  # a BlockMask (attention() resolved patterns); causal is in its mask_mod
    elif mask is not None and mask.dtype == torch.bool:
        block_mask = per_mask(mask, ("flex", causal, offset, shape), lambda: _tensor_block_mask(mask, causal, offset, shape))
    elif causal:
        block_mask = _causal_block_mask(shape[2], shape[3], offset, str(q.device))
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        bias = mask.to(q.dtype)
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(shape)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, h, q_idx, kv_idx]

    run = _compiled_flex() if q.device.type == "cuda" else _flex.flex_attention
    out, lse = run(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=options.scale, enable_gqa=k.shape[1] != q.shape[1], **_LSE)
    lse = getattr(lse, "lse", lse)  # AuxOutput on torch >= 2.9
    if block_mask is not None or score_mod is not None:
        # A row with no allowed key: the output contract is zeros.
        out = out.masked_fill((lse == float("-inf")).unsqueeze(-1), 0.0)
    return out, (lse.float() if options.return_lse else None)
