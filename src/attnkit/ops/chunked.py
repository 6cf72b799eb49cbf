"""The `chunked` backend: exact attention over KV blocks in plain PyTorch, a one-process model of ring attention.

Each block gives a partial ``(out, lse)`` that ``ops.lse.merge_partials`` folds into the running
result, exactly as ring attention merges the block that arrives from its neighbour. Extra memory is ``O(B * Hq * Sq * block_size)`` instead of the ``(B, Hq, Sq, Skv)`` scores, and
the log-sum-exp comes out (with a gradient), which is what ring attention merges partial
results with. Statistics and accumulators are kept in float32 (float64 for float64 inputs).

Backward recomputes each block's probabilities from the saved ``lse`` (as FlashAttention does)
in a custom ``autograd.Function``: letting autograd record the loop would keep every block's
scores and probabilities alive until backward, i.e. the full ``Sq x Skv`` matrix again.
"""

from __future__ import annotations

import torch

from attnkit.errors import check_arg
from attnkit.ops.lse import merge_partials
from attnkit.ops.masks import merged_mask, tensor_mask
from attnkit.ops.options import AttentionOptions

__all__ = ["chunked_attention", "BLOCK_SIZE"]

BLOCK_SIZE = 512
"""Keys per block; larger blocks run faster in eager mode and use more memory."""


class _Blocks:
    """Per-call constants and the per-block pieces shared by forward and backward."""

    def __init__(self, q, k, mask, causal, offset, scale, dropout_p, dropout_mask, seed, block_size):
        self.q, self.k, self.mask, self.causal, self.offset, self.scale = q, k, mask, causal, offset, scale
        self.dropout_p, self.dropout_mask, self.seed, self.block_size = dropout_p, dropout_mask, seed, block_size
        self.acc_dtype = torch.promote_types(q.dtype, torch.float32)

    def starts(self) -> range:
        return range(0, self.k.shape[2], self.block_size)

    def scores(self, start: int, end: int) -> torch.Tensor:
        """Scaled, masked scores ``(B, H, Sq, end - start)`` in the accumulator dtype."""
        scores = (self.q @ self.k[:, :, start:end].transpose(-2, -1)).to(self.acc_dtype) * self.scale
        seq_q, seq_kv = self.q.shape[2], self.k.shape[2]
        tile = merged_mask(
            self.mask, self.causal, seq_q, seq_kv, dtype=self.acc_dtype, device=self.q.device, kv_start=start, kv_end=end, offset=self.offset
        )
        if tile is None:
            return scores
        return scores.masked_fill(~tile, float("-inf")) if tile.dtype == torch.bool else scores + tile

    def keep(self, start: int, end: int, like: torch.Tensor) -> torch.Tensor | None:
        """Dropout keep-mask for the block, scaled by ``1/(1-p)``, or None without dropout.

        Without a given mask each block draws from its own seeded generator, so backward
        regenerates exactly the forward mask without storing it.
        """
        if self.dropout_p == 0:
            return None
        if self.dropout_mask is not None:
            keep = self.dropout_mask if self.dropout_mask.shape[-1] == 1 else self.dropout_mask[..., start:end]
        else:
            generator = torch.Generator(device=like.device).manual_seed(self.seed + start)
            keep = torch.rand(like.shape, generator=generator, device=like.device) >= self.dropout_p
        return keep.to(like.dtype) * (1.0 / (1.0 - self.dropout_p))


def _forward(blocks: _Blocks, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial ``(out, lse)`` per KV block, merged through the log-sum-exp (``merge_partials``)."""
    q = blocks.q
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=blocks.acc_dtype, device=q.device)  # (B, H, Sq, Dv)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=blocks.acc_dtype, device=q.device)  # (B, H, Sq)
    for start in blocks.starts():
        end = min(start + blocks.block_size, v.shape[2])
        scores = blocks.scores(start, end)
        block_lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # -inf for a row with no key here
        probs = torch.exp(scores - block_lse.masked_fill(block_lse == float("-inf"), 0.0))
        keep = blocks.keep(start, end, probs)
        if keep is not None:
            probs = probs * keep
        block_out = (probs.to(v.dtype) @ v[:, :, start:end]).to(blocks.acc_dtype)
        out, lse = merge_partials(out, lse, block_out, block_lse.squeeze(-1))
    return out, lse


def _backward(blocks: _Blocks, v, out, lse, grad_out, grad_lse, need_mask_grad: bool):
    q, k = blocks.q, blocks.k
    acc = blocks.acc_dtype
    q_acc = q.to(acc)
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.to(acc)  # only lse was used
    delta = (grad_out * out.to(acc)).sum(dim=-1, keepdim=True)  # (B, H, Sq, 1)
    safe_lse = lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1)
    grad_q = torch.zeros(q.shape, dtype=acc, device=q.device)
    grad_k = torch.zeros(k.shape, dtype=acc, device=q.device)
    grad_v = torch.zeros(v.shape, dtype=acc, device=q.device)
    grad_mask = torch.zeros(blocks.mask.shape, dtype=acc, device=q.device) if need_mask_grad else None
    for start in blocks.starts():
        end = min(start + blocks.block_size, k.shape[2])
        probs = torch.exp(blocks.scores(start, end) - safe_lse)  # (B, H, Sq, blk); 0 where masked
        v_block = v[:, :, start:end].to(acc)
        grad_probs = grad_out @ v_block.transpose(-2, -1)
        keep = blocks.keep(start, end, probs)
        dropped = probs if keep is None else probs * keep
        if keep is not None:
            grad_probs = grad_probs * keep
        grad_v[:, :, start:end] = dropped.transpose(-2, -1) @ grad_out
        grad_scores = probs * (grad_probs - delta)
        if grad_lse is not None:
            grad_scores = grad_scores + probs * grad_lse.to(acc).unsqueeze(-1)  # d lse / d scores = softmax
        grad_q += (grad_scores @ k[:, :, start:end].to(acc)) * blocks.scale
        grad_k[:, :, start:end] = (grad_scores.transpose(-2, -1) @ q_acc) * blocks.scale
        if grad_mask is not None:
            if grad_mask.shape[-1] == 1:
                grad_mask += grad_scores.sum_to_size(grad_mask.shape)
            else:
                grad_mask[..., start:end] += grad_scores.sum_to_size((*grad_mask.shape[:-1], end - start))
    return grad_q, grad_k, grad_v, grad_mask


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal, offset, scale, dropout_p, dropout_mask, seed, block_size):
        blocks = _Blocks(q, k, mask, causal, offset, scale, dropout_p, dropout_mask, seed, block_size)
        out, lse = _forward(blocks, v)
        ctx.save_for_backward(q, k, v, mask, dropout_mask, out, lse)
        ctx.options = (causal, offset, scale, dropout_p, seed, block_size)
        ctx.set_materialize_grads(False)  # an unused lse (or out) then costs no backward work
        return out.to(q.dtype), lse.float()

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, mask, dropout_mask, out, lse = ctx.saved_tensors
        causal, offset, scale, dropout_p, seed, block_size = ctx.options
        blocks = _Blocks(q, k, mask, causal, offset, scale, dropout_p, dropout_mask, seed, block_size)
        need_mask_grad = mask is not None and ctx.needs_input_grad[3]
        grad_q, grad_k, grad_v, grad_mask = _backward(blocks, v, out, lse, grad_out, grad_lse, need_mask_grad)
        grads = (grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None if grad_mask is None else grad_mask.to(mask.dtype))
        return (*grads, None, None, None, None, None, None, None)


def chunked_attention(q, k, v, options: AttentionOptions, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over KV blocks of ``block_size`` keys. Shapes as in ``attention()``;
    returns ``(out (B, Hq, Sq, Dv), lse (B, Hq, Sq) float32 | None)``."""
    check_arg(isinstance(block_size, int) and block_size >= 1, "block_size", "an int >= 1", block_size)
    seq_q, seq_kv = q.shape[2], k.shape[2]
    if (group := q.shape[1] // k.shape[1]) > 1:
        # GQA by expansion: autograd sums the gradients of repeated heads back onto each KV head.
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    dropout_p, dropout_mask = options.dropout_p, options.dropout_mask
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 and dropout_mask is None else 0
    offset = options.causal_offset(seq_q, seq_kv)
    out, lse = _ChunkedAttention.apply(
        q, k, v, tensor_mask(options.mask), options.causal, offset, options.scale, dropout_p, dropout_mask, seed, block_size
    )
    return out, (lse if options.return_lse else None)
