"""Planted faulty attention backends and a tiny model for the trust tests.

Each fault is a realistic kernel bug wrapped around the correct ``math`` backend, with
``attnkit.ops.attention``'s signature, so the validator can be pointed at it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops import attention, causal_mask


def correct_custom(q, k, v, *, mask=None, causal=False, scale=None, **options):
    """A correct custom kernel: the chunked backend (a different algorithm from math)."""
    return attention(q, k, v, mask=mask, causal=causal, scale=scale, backend="chunked", **options)


def scale_one_over_d(q, k, v, *, scale=None, **options):
    """Bug: scale 1/D instead of 1/sqrt(D)."""
    return attention(q, k, v, scale=1.0 / q.shape[-1], backend="math", **options)


def scale_ten_percent_off(q, k, v, *, scale=None, **options):
    """Bug: a subtly wrong scale, 1.1/sqrt(D)."""
    return attention(q, k, v, scale=1.1 / math.sqrt(q.shape[-1]), backend="math", **options)


def ignores_scale(q, k, v, *, scale=None, **options):
    """Bug: always uses the default 1/sqrt(D), whatever scale the layer passes (T5 passes 1.0)."""
    return attention(q, k, v, backend="math", **options)


def dropped_mask(q, k, v, *, mask=None, **options):
    """Bug: ignores the attention mask."""
    return attention(q, k, v, mask=None, backend="math", **options)


def _causal_with_offset(q, k, v, mask, causal, shift, options):
    if not causal:
        return attention(q, k, v, mask=mask, backend="math", **options)
    seq_q, seq_kv = q.shape[2], k.shape[2]
    allowed = causal_mask(seq_q, seq_kv, device=q.device, offset=seq_kv - seq_q + shift)
    merged = allowed if mask is None else (mask & allowed if mask.dtype == torch.bool else mask.masked_fill(~allowed, float("-inf")))
    return attention(q, k, v, mask=merged, causal=False, backend="math", **options)


def causal_off_by_one(q, k, v, *, mask=None, causal=False, **options):
    """Bug: each query also sees the next key (j <= i + Skv - Sq + 1)."""
    return _causal_with_offset(q, k, v, mask, causal, 1, options)


def causal_top_left(q, k, v, *, mask=None, causal=False, **options):
    """Bug: top-left causal alignment (j <= i), wrong whenever Sq != Skv."""
    seq_shift = -(k.shape[2] - q.shape[2])
    return _causal_with_offset(q, k, v, mask, causal, seq_shift, options)


def heads_transposed(q, k, v, **options):
    """Bug: reads (B, H, S, D) memory as if it were (B, S, H, D), and writes the output back the same way."""

    def scramble(t):
        b, h, s, d = t.shape
        return t.transpose(1, 2).reshape(b, h, s, d)

    out = attention(scramble(q), scramble(k), scramble(v), backend="math", **options)
    b, h, s, d = out.shape
    return out.reshape(b, s, h, d).transpose(1, 2)


def gqa_misassigned(q, k, v, **options):
    """Bug: query head h uses KV head h % Hkv instead of h // (Hq // Hkv)."""
    group = q.shape[1] // k.shape[1]
    return attention(q, k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1), backend="math", **options)


class _ZeroGrad(torch.autograd.Function):
    """Identity forward, zero gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


def zero_grad_k(q, k, v, **options):
    """Bug: a custom backward that returns zeros for k (forward is exact)."""
    return attention(q, _ZeroGrad.apply(k), v, backend="math", **options)


FAULTS = {
    "scale_1/D": scale_one_over_d,
    "scale_1.1x": scale_ten_percent_off,
    "ignores_scale": ignores_scale,
    "dropped_mask": dropped_mask,
    "causal_off_by_one": causal_off_by_one,
    "causal_top_left": causal_top_left,
    "heads_transposed": heads_transposed,
    "gqa_misassigned": gqa_misassigned,
    "zero_grad_k": zero_grad_k,
}


class TinyDecoder(nn.Module):
    """Two attention layers that call SDPA: a padding-masked one and a causal GQA one (Hq=4, Hkv=2)."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.qkv_masked = nn.Linear(dim, 3 * dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x, heads):  # (B, S, H*D) -> (B, H, S, D)
        return x.unflatten(-1, (heads, self.head_dim)).transpose(1, 2)

    def forward(self, x, padding):  # x (B, S, dim), padding (B, S) bool, True = real token
        q, k, v = (self._split(t, self.heads) for t in self.qkv_masked(x).chunk(3, dim=-1))
        x = x + F.scaled_dot_product_attention(q, k, v, attn_mask=padding[:, None, None, :]).transpose(1, 2).flatten(2)
        q = self._split(self.q(x), self.heads)
        k, v = (self._split(t, self.kv_heads) for t in self.kv(x).chunk(2, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.out(y.transpose(1, 2).flatten(2))


def tiny_inputs(batch: int = 2, seq: int = 24, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    padding = torch.ones(batch, seq, dtype=torch.bool)
    padding[0, seq - 5 :] = False
    return torch.randn(batch, seq, dim, generator=gen), padding
