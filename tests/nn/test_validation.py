"""Bad arguments raise InvalidArgumentError/InvalidTypeError naming the parameter, expected and got."""

from __future__ import annotations

import pytest
import torch

from attnkit.errors import InvalidArgumentError, InvalidTypeError
from attnkit.nn import MultiHeadAttention, from_torch


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        (dict(embed_dim=10, num_heads=3), "embed_dim"),
        (dict(embed_dim=12, num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(embed_dim=0, num_heads=1), "embed_dim"),
        (dict(embed_dim=12, num_heads=4, dropout=1.0), "dropout"),
        (dict(embed_dim=12, num_heads=4, head_dim=-2), "head_dim"),
        (dict(embed_dim=12, num_heads=4, query_chunk_size=0), "query_chunk_size"),
        (dict(embed_dim=12, num_heads=4, scale=0.0), "scale"),
        (dict(embed_dim=12, num_heads=4, backend="fast"), "backend"),
    ],
)
def test_bad_config(kwargs, parameter):
    with pytest.raises(InvalidArgumentError) as raised:
        MultiHeadAttention(**kwargs)
    assert raised.value.parameter == parameter and str(raised.value).startswith(f"{parameter}: expected ")


def test_head_dim_lifts_divisibility():
    assert MultiHeadAttention(10, 3, head_dim=4).in_proj_weight.shape == (36, 10)


MODULE = MultiHeadAttention(12, 4, kdim=6, batch_first=True, num_kv_heads=2)
Q, K = torch.randn(2, 5, 12), torch.randn(2, 7, 6)
V = torch.randn(2, 7, 12)


@pytest.mark.parametrize(
    "call, parameter, fragment",
    [
        (lambda: MODULE(torch.randn(2, 3, 5, 12), K, V), "query", "a 3-D (B, S, E)"),
        (lambda: MODULE(torch.randn(2, 5, 11), K, V), "query", "embed_dim=12"),
        (lambda: MODULE(Q, torch.randn(2, 7, 12), V), "key", "kdim=6"),
        (lambda: MODULE(Q, K[:1], V[:1]), "key", "batch size 2"),
        (lambda: MODULE(Q, K, V[:, :6]), "value", "batch and sequence sizes of key (2, 7)"),
        (lambda: MODULE(Q, K, V, attn_mask=torch.zeros(5, 6, dtype=torch.bool)), "attn_mask", "(Sq, Skv)=(5, 7)"),
        (lambda: MODULE(Q, K, V, attn_mask=torch.zeros(4, 5, 7)), "attn_mask", "(B*num_heads, Sq, Skv)=(8, 5, 7)"),
        (lambda: MODULE(Q, K, V, attn_mask=torch.zeros(5, 7, dtype=torch.int64)), "attn_mask", "bool"),
        (lambda: MODULE(Q, K, V, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), "key_padding_mask", "(B, Skv)=(2, 7)"),
        (lambda: MODULE(Q, K, V, dropout_mask=torch.ones(2, 4, 5, 7, dtype=torch.bool)), "dropout_mask", "None while dropout is inactive"),
    ],
)
def test_bad_forward_arguments(call, parameter, fragment):
    MODULE(Q, K, V)  # a valid layout is remembered; bad ones must still get their error, every time
    for _ in range(2):
        with pytest.raises(InvalidArgumentError) as raised:
            call()
        assert raised.value.parameter == parameter and fragment in str(raised.value)


def test_wrong_types():
    with pytest.raises(InvalidTypeError, match="query: expected Tensor"):
        MODULE([1.0], K, V)
    with pytest.raises(InvalidTypeError, match="module: expected MultiheadAttention"):
        from_torch(MODULE)
