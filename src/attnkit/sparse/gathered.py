"""Block-sparse attention in plain PyTorch: gather each query block's key blocks, softmax over them.

The work is proportional to the blocks a ``BlockMask`` lists (padded to the busiest row), not to
``Sq * Skv``, and autograd differentiates it, so it serves where FlexAttention cannot: backward on
CPU (FlexAttention's CPU kernel is forward-only) and float64. It reads only the BlockMask's
tables and ``mask_mod`` (applied in PARTIAL blocks, with indices clamped into the sequences),
which makes it an independent check of a BlockMask's meaning as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gathered_attention"]


def _slots(block_mask, n_q: int):
    """Key-block columns ``(B|1, H|1, nQ, K)`` at the mask's own batch/head sizes, which are real (same shape)
    and which are FULL ``(K,)``."""
    tables = [(block_mask.kv_num_blocks, block_mask.kv_indices, False)]
    if block_mask.full_kv_num_blocks is not None:
        tables.append((block_mask.full_kv_num_blocks, block_mask.full_kv_indices, True))
    columns, valid, full = [], [], []
    for counts, indices, is_full in tables:
        counts = counts[..., :n_q]
        width = int(counts.max()) if counts.numel() else 0
        columns.append(indices[..., :n_q, :width].long())
        valid.append(torch.arange(width, device=counts.device) < counts[..., None])
        full.append(torch.full((width,), is_full, device=counts.device))
    valid_all = torch.cat(valid, -1)
    return torch.cat(columns, -1).masked_fill(~valid_all, 0), valid_all, torch.cat(full)


def gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, *, scale: float, return_lse: bool = False):
    """Attention restricted to ``block_mask``; shapes as in ``attention()`` (GQA by head ratio).

    Args:
        q: ``(B, Hq, Sq, D)``; k: ``(B, Hkv, Skv, D)``; v: ``(B, Hkv, Skv, Dv)``.
        block_mask: a FlexAttention ``BlockMask`` of shape ``(B|1, Hq|1, Sq, Skv)`` whose
            ``mask_mod`` broadcasts over tensor indices (every attnkit pattern's does).
        scale: multiplies ``q k^T``.

    Returns:
        ``(out (B, Hq, Sq, Dv) in q's dtype, lse (B, Hq, Sq) float32 or None)``; a query with no
        allowed key gets zeros and ``lse = -inf``.
    """
    batch, heads, seq_q, _ = q.shape
    heads_kv, seq_kv, dim_v = k.shape[1], k.shape[2], v.shape[-1]
    block_q, block_kv = block_mask.BLOCK_SIZE
    n_q, n_kv = -(-seq_q // block_q), -(-seq_kv // block_kv)
    columns, valid, full = _slots(block_mask, n_q)  # (B|1, H|1, nQ, K) twice, (K,)
    q_blocks = F.pad(q, (0, 0, 0, n_q * block_q - seq_q)).view(batch, heads, n_q, block_q, -1)
    k_blocks = F.pad(k, (0, 0, 0, n_kv * block_kv - seq_kv)).view(batch, heads_kv, n_kv, block_kv, -1)
    v_blocks = F.pad(v, (0, 0, 0, n_kv * block_kv - seq_kv)).view(batch, heads_kv, n_kv, block_kv, dim_v)
    b_index = torch.arange(batch, device=q.device)[:, None, None, None]
    h_index = (torch.arange(heads, device=q.device) // (heads // heads_kv))[None, :, None, None]
    k_sel = k_blocks[b_index, h_index, columns].flatten(3, 4)  # (B, H, nQ, K * bk, D)
    v_sel = v_blocks[b_index, h_index, columns].flatten(3, 4)  # (B, H, nQ, K * bk, Dv)
    scores = (q_blocks @ k_sel.transpose(-1, -2)) * scale  # (B, H, nQ, bq, K * bk)

    # The mask at the BlockMask's own batch/head sizes (1 for a static pattern), broadcast over the scores.
    q_idx = (torch.arange(n_q, device=q.device)[:, None] * block_q + torch.arange(block_q, device=q.device))[:, :, None]  # (nQ, bq, 1)
    kv_idx = (columns[..., None] * block_kv + torch.arange(block_kv, device=q.device)).flatten(-2)[..., None, :]  # (B|1, H|1, nQ, 1, K * bk)
    inside = (q_idx < seq_q) & (kv_idx < seq_kv) & valid.repeat_interleave(block_kv, -1)[..., None, :]
    b_idx = torch.arange(columns.shape[0], device=q.device).view(-1, 1, 1, 1, 1)
    h_idx = torch.arange(columns.shape[1], device=q.device).view(1, -1, 1, 1, 1)
    masked = block_mask.mask_mod(b_idx, h_idx, q_idx.clamp(max=seq_q - 1), kv_idx.clamp(max=seq_kv - 1))
    allowed = inside & (full.repeat_interleave(block_kv) | masked)  # (B|1, H|1, nQ, bq, K * bk)

    work = torch.promote_types(q.dtype, torch.float32)
    scores = scores.to(work).masked_fill(~allowed, float("-inf"))
    empty = ~allowed.any(-1, keepdim=True)
    lse = torch.logsumexp(scores, -1).float().reshape(batch, heads, n_q * block_q)[..., :seq_q] if return_lse else None
    # Softmax of an all -inf row is NaN (and so is its gradient): give those rows finite scores, then zero them.
    probs = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0).to(q.dtype)
    out = probs @ v_sel  # (B, H, nQ, bq, Dv)
    return out.reshape(batch, heads, n_q * block_q, dim_v)[:, :, :seq_q], lse
