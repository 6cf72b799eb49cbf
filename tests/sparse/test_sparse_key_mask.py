"""``sparse_attention(..., key_mask=)``: padding ANDed with a pattern or a content-aware selection (float64)."""

from __future__ import annotations

import pytest
import torch

from attnkit.errors import InvalidArgumentError, UnsupportedError
from attnkit.ops import attention
from attnkit.sparse import ContentAware, SlidingWindow, select_blocks, sparse_attention


def _qkv(batch=2, heads=4, heads_kv=2, seq=203, dim=8):
    gen = torch.Generator().manual_seed(0)
    shapes = [(batch, heads, seq, dim), (batch, heads_kv, seq, dim), (batch, heads_kv, seq, dim)]
    return [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]


def _key_mask(batch=2, seq=203):
    keep = torch.ones(batch, seq, dtype=torch.bool)
    keep[0, 150:] = False  # whole blocks of 32 dropped, and one cut
    keep[1, 5:40] = False
    return keep


def _grads(out, tensors):
    return torch.autograd.grad(out, tensors, torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))


def test_content_aware_with_key_mask_matches_dense_masked():
    q, k, v = _qkv()
    keep = _key_mask()
    config = ContentAware(block_size=32, density=0.3)
    out = sparse_attention(q, k, v, config, key_mask=keep)
    blocks = select_blocks(q, k, config).blocks.repeat_interleave(32, 2).repeat_interleave(32, 3)[..., :203, :203]
    allowed = blocks & config.base.to_dense(203) & keep[:, None, None, :]
    ref = attention(q, k, v, mask=allowed, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_bad_key_masks_raise():
    q, k, v = _qkv()
    with pytest.raises(InvalidArgumentError, match="key_mask"):
        sparse_attention(q, k, v, SlidingWindow(8), key_mask=torch.ones(2, 202, dtype=torch.bool))
    with pytest.raises(InvalidArgumentError, match="key_mask"):
        sparse_attention(q, k, v, SlidingWindow(8), key_mask=torch.ones(2, 203))
    block_mask = SlidingWindow(8).block_mask(203, 203)
    with pytest.raises(UnsupportedError, match="key_mask"):
        sparse_attention(q, k, v, block_mask, key_mask=_key_mask())
