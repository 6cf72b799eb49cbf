"""The `chunked` backend: exact attention over KV blocks in plain PyTorch, a one-process model of ring attention.

Each block's softmax output merges into the running result as ``ops.lse.merge_partials`` merges
the block that ring attention receives from its neighbour, with each log-sum-exp kept as a row
max and a sum of ``exp(score - max)``: the weights then carry no rounded float32 lse (about
``|lse|`` ulps each), and a single block's probabilities and output round as `math` rounds them.
Extra memory is ``O(B * Hq * Sq * block_size)`` instead of the ``(B, Hq, Sq, Skv)`` scores, and the
log-sum-exp comes out (with a gradient), which is what ring attention merges partial results with.
Statistics and accumulators are kept in float32 (float64 for float64 inputs).

Backward recomputes each block's probabilities from the saved row max and sum (as FlashAttention
does from the lse) in a custom ``autograd.Function``: letting autograd record the loop would keep
every block's scores and probabilities alive until backward, i.e. the full ``Sq x Skv`` matrix again.
"""

from __future__ import annotations

import torch

from attnkit.errors import check_arg
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
        """Scaled, masked scores ``(B, H, Sq, end - start)`` in the accumulator dtype; a new tensor (callers work in place)."""
        scores = (self.q @ self.k[:, :, start:end].transpose(-2, -1)).to(self.acc_dtype).mul_(self.scale)
        seq_q, seq_kv = self.q.shape[2], self.k.shape[2]
        tile = merged_mask(
            self.mask, self.causal, seq_q, seq_kv, dtype=self.acc_dtype, device=self.q.device, kv_start=start, kv_end=end, offset=self.offset
        )
        if tile is None:
            return scores
        return scores.masked_fill_(~tile, float("-inf")) if tile.dtype == torch.bool else scores.add_(tile)

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


def _forward(blocks: _Blocks, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention block by block, merged as the module doc says; returns ``(out (B, H, Sq, Dv), row_max, row_sum (B, H, Sq))``.

    ``row_sum``, the sum of ``exp(score - row_max)``, is at least 1 (the max contributes ``exp(0)``);
    a row with no allowed key has ``row_max = -inf``, zero output and ``row_sum = 1``.
    """
    q, acc = blocks.q, blocks.acc_dtype
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=acc, device=q.device)
    row_max = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    row_sum = torch.ones(q.shape[:3], dtype=acc, device=q.device)
    for start in blocks.starts():
        end = min(start + blocks.block_size, v.shape[2])
        scores = blocks.scores(start, end)
        block_max = scores.amax(dim=-1)
        probs = scores.sub_(_finite(block_max).unsqueeze(-1)).exp_()  # (B, H, Sq, blk)
        block_sum = probs.sum(dim=-1).clamp_min_(1.0)  # 1 for a row with no key here: its probs stay 0
        probs.div_(block_sum.unsqueeze(-1))
        keep = blocks.keep(start, end, probs)
        if keep is not None:
            probs.mul_(keep)
        block_out = (probs.to(v.dtype) @ v[:, :, start:end]).to(acc)
        new_max = torch.maximum(row_max, block_max)
        weight_old = row_sum * torch.exp(row_max - _finite(new_max))  # 0 while a row had no key
        weight_new = block_sum * torch.exp(block_max - _finite(new_max))
        row_max, row_sum = new_max, (weight_old + weight_new).clamp_min_(1.0)
        out = out * (weight_old / row_sum).unsqueeze(-1) + block_out * (weight_new / row_sum).unsqueeze(-1)
    return out, row_max, row_sum


def _finite(row_max: torch.Tensor) -> torch.Tensor:
    """``row_max`` with 0 for a row with no allowed key, so ``exp(score - max)`` there is 0, not NaN."""
    return row_max.masked_fill(row_max == float("-inf"), 0.0)


def _backward(blocks: _Blocks, v, row_max, row_sum, grad_out, grad_lse, need_mask_grad: bool):
    q, k = blocks.q, blocks.k
    acc = blocks.acc_dtype
    q_acc = q.to(acc)
    if grad_out is None:  # only lse was used
        grad_out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=acc, device=q.device)
    grad_out = grad_out.to(acc)
    safe_max, row_sum = _finite(row_max).unsqueeze(-1), row_sum.unsqueeze(-1)

    def recompute(start: int) -> tuple[int, int, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(start, end, probs, keep, grad_probs)``: the block's softmax ``(B, H, Sq, blk)``, rounded as
        `math` rounds it, its dropout keep-mask (or None) and the gradient with respect to it."""
        end = min(start + blocks.block_size, k.shape[2])
        probs = blocks.scores(start, end).sub_(safe_max).exp_().div_(row_sum)  # 0 where masked
        grad_probs = grad_out @ v[:, :, start:end].to(acc).transpose(-2, -1)
        keep = blocks.keep(start, end, probs)
        return start, end, probs, keep, (grad_probs if keep is None else grad_probs.mul_(keep))

    # delta = rowsum(P * dP) from the same rounded dP that grad_scores subtracts it from, as softmax's
    # own backward does, so a dominant P_j * dP_j cancels. FlashAttention's rowsum(dO * O) rounds
    # apart from dP and made float32 dq and dk several times less accurate than `math`. It costs a
    # first pass over the blocks; a single block is computed once.
    starts = blocks.starts()
    single = [recompute(starts[0])] if len(starts) == 1 else None
    delta = sum((probs * grad_probs).sum(dim=-1, keepdim=True) for _, _, probs, _, grad_probs in single or map(recompute, starts))

    grad_q = torch.zeros(q.shape, dtype=acc, device=q.device)
    grad_k = torch.zeros(k.shape, dtype=acc, device=q.device)
    grad_v = torch.zeros(v.shape, dtype=acc, device=q.device)
    grad_mask = torch.zeros(blocks.mask.shape, dtype=acc, device=q.device) if need_mask_grad else None
    for start, end, probs, keep, grad_probs in single or map(recompute, starts):
        dropped = probs if keep is None else probs * keep
        grad_v[:, :, start:end] = dropped.transpose(-2, -1) @ grad_out
        grad_scores = grad_probs.sub_(delta).mul_(probs)
        if grad_lse is not None:
            grad_scores += probs * grad_lse.to(acc).unsqueeze(-1)  # d lse / d scores = softmax
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
        out, row_max, row_sum = _forward(blocks, v)
        ctx.save_for_backward(q, k, v, mask, dropout_mask, row_max, row_sum)
        ctx.options = (causal, offset, scale, dropout_p, seed, block_size)
        ctx.set_materialize_grads(False)  # an unused lse (or out) then costs no backward work
        return out.to(q.dtype), (row_max + torch.log(row_sum)).float()

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, mask, dropout_mask, row_max, row_sum = ctx.saved_tensors
        causal, offset, scale, dropout_p, seed, block_size = ctx.options
        blocks = _Blocks(q, k, mask, causal, offset, scale, dropout_p, dropout_mask, seed, block_size)
        need_mask_grad = mask is not None and ctx.needs_input_grad[3]
        grad_q, grad_k, grad_v, grad_mask = _backward(blocks, v, row_max, row_sum, grad_out, grad_lse, need_mask_grad)
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
