"""KVCache: prefill + decode and any chunking of a causal sequence equal one call on the whole sequence."""

from __future__ import annotations

import pytest
import torch

from attnkit.errors import InvalidArgumentError
from attnkit.nn import KVCache, MultiHeadAttention
from mha_reference import randomize_

SEQ = 10


def build(**overrides) -> MultiHeadAttention:
    config = dict(embed_dim=32, num_heads=4, num_kv_heads=2, batch_first=True, backend="math") | overrides
    return randomize_(MultiHeadAttention(**config, dtype=torch.float64), seed=1)


def run_in_chunks(module, x, sizes, **masks):
    """Feed ``x (B, S, E)`` chunk by chunk through one cache; slice the per-key and per-pair masks to match."""
    cache, outs, start = KVCache(), [], 0
    for size in sizes:
        stop = start + size
        step = {}
        if "key_padding_mask" in masks:
            step["key_padding_mask"] = masks["key_padding_mask"][:, start:stop]  # the new keys only
        if "attn_mask" in masks:
            step["attn_mask"] = masks["attn_mask"][start:stop, :stop]  # all keys seen so far
        outs.append(module(x[:, start:stop], need_weights=False, is_causal=True, kv_cache=cache, **step)[0])
        start = stop
    assert cache.seq_len == x.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize(
    "sizes, overrides",
    [
        ([6, 1, 1, 1, 1], {}),  # prefill then decode
        ([3, 1, 4, 2], {"query_chunk_size": 2}),
        ([1] * SEQ, {"add_bias_kv": True, "add_zero_attn": True}),
        ([5, 5], {"num_kv_heads": 1, "head_dim": 5, "v_head_dim": 3}),
    ],
)
def test_chunks_equal_whole_sequence(sizes, overrides):
    module = build(**overrides)
    x = torch.randn(3, SEQ, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    padding = torch.zeros(3, SEQ, dtype=torch.bool)
    padding[1, :2] = True  # left-padded prompt
    bias = torch.randn(SEQ, SEQ, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    bias = bias.masked_fill(torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1), float("-inf"))  # with attn_mask, is_causal is a hint
    whole, _ = module(x, need_weights=False, is_causal=True, key_padding_mask=padding, attn_mask=bias)
    chunked = run_in_chunks(module, x, sizes, key_padding_mask=padding, attn_mask=bias)
    torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-10)


def test_weights_cover_cached_keys():
    module, cache = build(), KVCache()
    x = torch.randn(2, 4, 32, dtype=torch.float64)
    module(x[:, :3], is_causal=True, kv_cache=cache)
    _, weights = module(x[:, 3:], is_causal=True, kv_cache=cache)
    assert weights.shape == (2, 1, 4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 1, dtype=torch.float64))


def test_cache_state_and_reset():
    module, cache = build(), KVCache()
    assert cache.seq_len == 0 and repr(cache) == "KVCache(empty)"
    module(torch.randn(2, 3, 32, dtype=torch.float64), kv_cache=cache)
    assert cache.key.shape == (2, 2, 3, 8) and cache.key_keep is None and "key=(2, 2, 3, 8)" in repr(cache)
    module(torch.randn(2, 1, 32, dtype=torch.float64), kv_cache=cache, key_padding_mask=torch.tensor([[True], [False]]))
    assert cache.key_keep.tolist() == [[True, True, True, False], [True, True, True, True]]
    cache.reset()
    assert cache.seq_len == 0


def test_cache_misuse_raises():
    module, cache = build(), KVCache()
    module(torch.randn(2, 3, 32, dtype=torch.float64), kv_cache=cache)
    with pytest.raises(InvalidArgumentError, match="kv_cache key: expected shape"):
        module(torch.randn(3, 1, 32, dtype=torch.float64), kv_cache=cache)
    with pytest.raises(InvalidArgumentError, match="key_padding_mask: expected a bool tensor"):
        module(torch.randn(2, 1, 32, dtype=torch.float64), kv_cache=cache, key_padding_mask=torch.zeros(2, 1, dtype=torch.float64))
