"""sparse_attention against the float64 reference with the pattern's dense mask: outputs, LSE and
gradients on partial blocks and GQA; the ops backend; FlexAttention agreeing on the same BlockMask;
a planted fault in a block table that the comparison must catch."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from attnkit.errors import InvalidTypeError, UnsupportedError
from attnkit.ops import attention
from attnkit.sparse import BigBird, Causal, Dilated, Documents, GlobalTokens, PrefixLM, SlidingWindow, sparse_attention

# float64 in, float64 out: the gathered path and the reference differ only by summation order.
TOL_FP64 = 1e-10
# float32: the bar (fp32 1e-5) against the float64 reference.
TOL_FP32 = 1e-5

PATTERNS = [
    Causal(),
    SlidingWindow(70),
    SlidingWindow(50, causal=False),
    Dilated(3) | SlidingWindow(16),
    GlobalTokens(4) | SlidingWindow(33),
    PrefixLM(90),
    Documents((60, 100, 97)),
    BigBird(48, num_global=2, num_random=2, block=64),
]


def _inputs(batch, heads, heads_kv, q_len, kv_len, dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda h, s: torch.randn(batch, h, s, dim, generator=generator, dtype=dtype).requires_grad_()  # noqa: E731
    return make(heads, q_len), make(heads_kv, kv_len), make(heads_kv, kv_len)


def _check(pattern, q, k, v, tolerance, block_size=64):
    out, lse = sparse_attention(q, k, v, pattern, block_size=block_size, return_lse=True)
    dense = pattern.to_dense(q.shape[2], k.shape[2])
    ref, ref_lse = attention(q, k, v, mask=dense, backend="reference", return_lse=True)
    torch.testing.assert_close(out, ref, atol=tolerance, rtol=tolerance)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=tolerance, rtol=tolerance)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, atol=tolerance * 10, rtol=tolerance * 10, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_matches_reference_float64_partial_blocks_and_gqa(pattern):
    # 257 keys, 64-blocks: the last block holds one key; Sq=200 < Skv: bottom-right aligned rows; GQA 4:2.
    kv_len = 257
    for q_len in (257, 200):
        _check(pattern, *_inputs(2, 4, 2, q_len, kv_len, 16, torch.float64), TOL_FP64)


@pytest.mark.parametrize("pattern", [SlidingWindow(70), Documents((60, 100, 97))], ids=repr)
def test_matches_reference_float32(pattern):
    _check(pattern, *_inputs(1, 4, 1, 257, 257, 32, torch.float32, seed=1), TOL_FP32)


def test_rows_with_no_allowed_key_get_zeros():
    # Sinks (positions < 4) seen only within a 3-key window: queries at positions >= 6 see nothing.
    pattern = GlobalTokens(4) & SlidingWindow(3)
    q, k, v = _inputs(1, 2, 2, 100, 100, 16, torch.float64)
    out, lse = sparse_attention(q, k, v, pattern, block_size=32, return_lse=True)
    assert torch.all(out[:, :, 6:] == 0) and torch.all(lse[:, :, 6:] == float("-inf"))
    _check(pattern, q, k, v, TOL_FP64, block_size=32)


def test_through_ops_attention_with_the_sparse_backend():
    q, k, v = _inputs(2, 4, 4, 130, 130, 16, torch.float64)
    pattern = SlidingWindow(40)
    out = attention(q, k, v, mask=pattern, backend="sparse")  # resolved at attention()'s block size (128)
    torch.testing.assert_close(out, attention(q, k, v, mask=pattern.to_dense(130), backend="reference"), atol=TOL_FP64, rtol=TOL_FP64)
    with pytest.raises(UnsupportedError, match="sparse"):
        attention(q, k, v, causal=True, backend="sparse")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_reads_the_block_mask_the_same_way():
    # FlexAttention (eager, CPU forward) and the gathered path run the same BlockMask; both equal the reference.
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 257, 257, 16, torch.float32, seed=2))
    for pattern in (SlidingWindow(70), BigBird(48, num_global=2, num_random=2, block=64)):
        block_mask = pattern.block_mask(257, 257, block_size=64)
        flex = flex_attention(q, k, v, block_mask=block_mask)
        ours = sparse_attention(q, k, v, block_mask)
        torch.testing.assert_close(ours, flex, atol=TOL_FP32, rtol=TOL_FP32)


def test_a_dropped_block_is_caught():
    # Planted fault: remove one FULL block from one row of the table; the output must move away from the reference.
    pattern = SlidingWindow(150)
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 257, 257, 16, torch.float64))
    good = pattern.block_mask(257, 257, block_size=64)
    counts = good.full_kv_num_blocks.clone()
    row = int(torch.nonzero(counts[0, 0] > 0)[0])
    counts[0, 0, row] -= 1
    faulty = BlockMask.from_kv_blocks(good.kv_num_blocks, good.kv_indices, counts, good.full_kv_indices,
                                      BLOCK_SIZE=good.BLOCK_SIZE, mask_mod=good.mask_mod, seq_lengths=(257, 257))  # fmt: skip
    ref = attention(q, k, v, mask=pattern.to_dense(257), backend="reference")
    torch.testing.assert_close(sparse_attention(q, k, v, good), ref, atol=TOL_FP64, rtol=TOL_FP64)
    error = (sparse_attention(q, k, v, faulty) - ref).abs().amax(dim=(0, 1, 3))  # per query
    assert error[row * 64 : (row + 1) * 64].min() > 1e-3  # every query of the damaged row is wrong
    assert error[: row * 64].max() < TOL_FP64  # and nothing else


def test_bad_pattern_type():
    q, k, v = _inputs(1, 1, 1, 8, 8, 4, torch.float32)
    with pytest.raises(InvalidTypeError, match="pattern"):
        sparse_attention(q, k, v, "window")
