"""`attention_weights()`: the probabilities of an `attention()` call, with its exact mask/causal/dropout/empty-row rules.

The reference weights are ``attention(q, k, I, backend="reference")``: attending over the
identity returns ``P @ I = P`` from the float64 reference, an independent route through the op.
Tolerance: 1e-12 relative in float64 (both are float64 formulas), and weights @ v must equal
the ``math`` backend bit for bit (the same operations in the same order).
"""

import pytest
import torch

from attnkit.errors import InvalidArgumentError, InvalidTypeError
from attnkit.ops import attention, attention_weights

# (B, Hq, Hkv, Sq, Skv, D, options): odd lengths, Sq != Skv both ways, GQA, MQA, every mask kind.
CASES = {
    "plain": (2, 2, 2, 7, 7, 16, {}),
    "causal-kv-cache": (1, 2, 2, 5, 13, 16, {"causal": True}),
    "causal-sq>skv": (1, 2, 1, 13, 5, 8, {"causal": True}),
    "gqa-bool-empty-row": (2, 4, 2, 17, 11, 24, {"mask": "bool"}),
    "mqa-additive-causal": (1, 4, 1, 9, 9, 16, {"mask": "additive", "causal": True}),
    "dropout-mask-gqa": (1, 4, 2, 9, 23, 16, {"dropout_p": 0.3, "dropout_mask": True, "causal": True}),
    "scale": (1, 2, 2, 3, 5, 59, {"scale": 0.7}),
}


def _inputs(case, dtype=torch.float64):
    batch, heads_q, heads_kv, seq_q, seq_kv, dim, options = case
    q, k = torch.randn(batch, heads_q, seq_q, dim, dtype=dtype), torch.randn(batch, heads_kv, seq_kv, dim, dtype=dtype)
    options = dict(options)
    if options.get("mask") == "bool":
        mask = torch.rand(batch, 1, seq_q, seq_kv) > 0.3
        mask[..., seq_q // 2, :] = False  # a query with no allowed key
        options["mask"] = mask
    elif options.get("mask") == "additive":
        options["mask"] = torch.randn(heads_q, 1, seq_kv, dtype=dtype)
    if options.pop("dropout_mask", False):
        options["dropout_mask"] = torch.rand(batch, heads_q, seq_q, seq_kv) > options["dropout_p"]
    return q, k, options


def _reference_weights(q, k, options):
    batch, heads_kv, seq_kv = k.shape[:3]
    eye = torch.eye(seq_kv, dtype=q.dtype).expand(batch, heads_kv, seq_kv, seq_kv)
    return attention(q, k, eye, backend="reference", **options)


@pytest.mark.parametrize("case", CASES)
def test_weights_match_the_reference(case):
    q, k, options = _inputs(CASES[case])
    weights = attention_weights(q, k, **options)
    assert weights.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) and weights.dtype == q.dtype
    torch.testing.assert_close(weights, _reference_weights(q, k, options), rtol=1e-12, atol=1e-12)
    if "dropout_p" not in options:  # rows sum to one, or are all zeros when no key is allowed
        sums = weights.sum(dim=-1)
        assert torch.all(((sums - 1).abs() < 1e-12) | (sums == 0))


@pytest.mark.parametrize("case", CASES)
def test_weights_times_v_is_the_math_backend_bit_for_bit(case):
    q, k, options = _inputs(CASES[case], torch.float32)
    v = torch.randn(*k.shape[:3], 12)
    group = q.shape[1] // k.shape[1]
    out = attention_weights(q, k, **options) @ v.repeat_interleave(group, dim=1)
    assert torch.equal(out, attention(q, k, v, backend="math", **options))


def test_empty_rows_are_zero():
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 2, 8)
    weights = attention_weights(q, k, causal=True)  # bottom-right: queries 0 and 1 see no key
    assert torch.equal(weights[0, 0, :2], torch.zeros(2, 2)) and torch.all(weights[0, 0, 2:].sum(-1) > 0.99)


@pytest.mark.parametrize("case", ["gqa-bool-empty-row", "mqa-additive-causal", "dropout-mask-gqa"])
def test_gradients_match_the_reference(case):
    q, k, options = _inputs(CASES[case])
    learned_mask = options.get("mask") is not None and options["mask"].is_floating_point()
    leaves = [q.requires_grad_(), k.requires_grad_()] + ([options["mask"].requires_grad_()] if learned_mask else [])
    upstream = torch.randn(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=q.dtype)
    got = torch.autograd.grad((attention_weights(q, k, **options) * upstream).sum(), leaves)
    expected = torch.autograd.grad((_reference_weights(q, k, options) * upstream).sum(), leaves)
    for name, x, ref in zip(["dq", "dk", "dmask"], got, expected):
        torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    "args, kwargs, parameter",
    [
        ((torch.randn(2, 4, 5, 8), torch.randn(1, 2, 7, 8)), {}, "k.shape[0] (batch)"),
        ((torch.randn(2, 4, 5, 8), torch.randn(2, 3, 7, 8)), {}, "k.shape[1] (KV heads)"),
        ((torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 6)), {}, "k.shape[3] (head dim)"),
        ((torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8).double()), {}, "k.dtype"),
        ((torch.randn(2, 4, 5, 8), torch.randn(2, 7, 8)), {}, "k"),
        ((torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8)), {"mask": torch.ones(5, 6, dtype=torch.bool)}, "mask"),
        ((torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8)), {"dropout_mask": torch.ones(5, 7, dtype=torch.bool)}, "dropout_p"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_bad_arguments_name_q_k_or_the_option_never_v(args, kwargs, parameter):
    with pytest.raises(InvalidArgumentError) as info:
        attention_weights(*args, **kwargs)
    assert info.value.parameter == parameter


def test_wrong_types():
    with pytest.raises(InvalidTypeError, match="k: expected Tensor"):
        attention_weights(torch.randn(1, 1, 2, 4), [[1.0]])
    with pytest.raises(InvalidTypeError, match="causal"):
        attention_weights(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), causal=1)
