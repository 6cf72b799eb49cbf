"""``MultiHeadAttention(sparsity=...)`` against the dense layer given the pattern's dense mask (float64).

Both layers run the same float64 projections; the only difference is block-sparse vs masked dense
attention, so outputs and every gradient agree to float64 rounding (atol 1e-12).
"""

from __future__ import annotations

import pytest
import torch

from attnkit.errors import InvalidArgumentError, InvalidTypeError, UnsupportedError
from attnkit.nn import KVCache, MultiHeadAttention
from attnkit.sparse import BigBird, ContentAware, Documents, GlobalTokens, PrefixLM, SlidingWindow, select_blocks

E, H, HKV = 16, 4, 2
ATOL = 1e-12
SEQ = 301  # three 128-blocks, the last one cut


def _pair(sparsity, seed=0):
    torch.manual_seed(seed)
    dense = MultiHeadAttention(E, H, batch_first=True, num_kv_heads=HKV, dtype=torch.float64)
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    sparse = MultiHeadAttention(E, H, batch_first=True, num_kv_heads=HKV, dtype=torch.float64, sparsity=sparsity)
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


def _padding(batch=2, seq=SEQ):
    pad = torch.zeros(batch, seq, dtype=torch.bool)
    pad[1, 120:] = True  # key blocks 1 and 2 of entry 1 wholly padded, block 0 partly
    return pad


def _run_both(dense, sparse, x, dense_mask, sparse_only=None, **kwargs):
    """Outputs and gradients (input and parameters) of both layers on the same input."""
    results = []
    for layer, extra in ((dense, {"attn_mask": dense_mask}), (sparse, sparse_only or {})):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        out, weights = layer(xi, need_weights=False, **extra, **kwargs)
        assert weights is None
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        results.append((out.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()]))
    return results


def _assert_same(results):
    (out_d, gx_d, gp_d), (out_s, gx_s, gp_s) = results
    torch.testing.assert_close(out_s, out_d, atol=ATOL, rtol=0)
    torch.testing.assert_close(gx_s, gx_d, atol=ATOL, rtol=0)
    for a, b in zip(gp_s, gp_d):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


PATTERNS = [
    SlidingWindow(40) | GlobalTokens(3),
    BigBird(window=32, num_global=1, num_random=1, block=32, seed=3),
    Documents((100, 150, 51)),
    PrefixLM(64),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
@pytest.mark.parametrize("padded", [False, True])
def test_static_pattern_matches_dense_masked(pattern, padded):
    dense, sparse = _pair(pattern)
    x = torch.randn(2, SEQ, E, dtype=torch.float64)
    pad = _padding() if padded else None
    results = _run_both(dense, sparse, x, ~pattern.to_dense(SEQ), key_padding_mask=pad)
    _assert_same(results)
    if padded:  # the padding mattered: rows of entry 1 differ from an unpadded run
        unpadded, _ = sparse(x, need_weights=False)
        assert (unpadded[1] - results[1][0][1]).abs().max() > 1e-3


def test_is_causal_is_anded_with_the_pattern():
    pattern = SlidingWindow(20, causal=False)
    dense, sparse = _pair(pattern)
    x = torch.randn(2, SEQ, E, dtype=torch.float64)
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    # (the dense layer gets the causal mask itself: with an attn_mask, torch's is_causal is only a hint)
    _assert_same(_run_both(dense, sparse, x, ~(pattern.to_dense(SEQ) & causal), sparse_only={"is_causal": True}))


def _content_mask(layer, x, config):
    """The dense (B, H, S, S) allowed mask of the layer's content-aware selection."""
    q, k, _ = layer._project(x, x, x, True)  # (B, H, S, D), (B, HKV, S, D)
    selection = select_blocks(q, k, config, scale=layer.config.softmax_scale)
    b = config.block_size
    blocks = selection.blocks.repeat_interleave(b, 2).repeat_interleave(b, 3)[..., : x.shape[1], : x.shape[1]]
    assert 0.1 < selection.kept < 0.9  # a real selection, neither everything nor the forced blocks only
    return blocks & config.base.to_dense(x.shape[1])


def test_content_aware_matches_dense_with_its_selection():
    config = ContentAware(block_size=32, density=0.4)
    dense, sparse = _pair(config, seed=1)
    x = torch.randn(2, SEQ, E, dtype=torch.float64)
    allowed = _content_mask(sparse, x, config)
    _assert_same(_run_both(dense, sparse, x, ~allowed))


def test_kv_cache_decoding_matches_the_full_sequence():
    pattern = SlidingWindow(50) | GlobalTokens(2)
    _, sparse = _pair(pattern)
    x = torch.randn(2, SEQ, E, dtype=torch.float64)
    full, _ = sparse(x, need_weights=False)
    cache = KVCache()
    first, _ = sparse(x[:, :290], need_weights=False, kv_cache=cache)
    rest, _ = sparse(x[:, 290:], need_weights=False, kv_cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=ATOL, rtol=0)


def test_state_dict_and_config_unchanged():
    dense, sparse = _pair(SlidingWindow(8))
    assert list(sparse.state_dict()) == list(dense.state_dict())
    rebuilt = MultiHeadAttention.from_config(sparse.config)
    assert rebuilt.config == sparse.config


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda m, x: m(x), UnsupportedError, "need_weights=False"),
        (lambda m, x: m(x, need_weights=False, attn_mask=torch.zeros(9, 9, dtype=torch.bool)), UnsupportedError, "attn_mask"),
        (lambda m, x: m(x, need_weights=False, key_padding_mask=torch.zeros(2, 9)), InvalidArgumentError, "key_padding_mask"),
        (lambda m, x: m(x, need_weights=False, dropout_mask=torch.ones(9, 9, dtype=torch.bool)), InvalidArgumentError, "dropout_mask"),
    ],
)
def test_unsupported_calls_raise_clearly(call, error, words):
    _, sparse = _pair(SlidingWindow(4))
    with pytest.raises(error, match=words):
        call(sparse, torch.randn(2, 9, E, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, parameter",
    [({"add_bias_kv": True}, "add_bias_kv"), ({"dropout": 0.1}, "dropout"), ({"backend": "math"}, "backend"),
     ({"query_chunk_size": 8}, "query_chunk_size")],
)
def test_conflicting_options_raise(kwargs, parameter):
    with pytest.raises(InvalidArgumentError, match=parameter):
        MultiHeadAttention(E, H, sparsity=SlidingWindow(4), **kwargs)


def test_bad_sparsity_type():
    with pytest.raises((InvalidArgumentError, InvalidTypeError), match="sparsity"):
        MultiHeadAttention(E, H, sparsity="window:4")
