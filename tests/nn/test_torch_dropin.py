"""Drop-in: MultiHeadAttention built and called exactly as torch.nn.MultiheadAttention gives torch's results.

Every constructor form (positional and keyword), masks of both kinds, torch's ``is_causal`` hint
rule, weights, empty inputs, NaN inputs and train/eval, against torch itself: fp32 within 1e-5,
fp64 within 1e-10 (plain rounding on these sizes is ~1e-7 and ~1e-16).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from attnkit.errors import UnsupportedError
from attnkit.nn import MultiHeadAttention
from attnkit.ops import BACKENDS
from mha_reference import randomize_

# torch's constructor arguments, exactly as a user would write them.
FORMS = {
    "defaults": ((16, 4), {}),
    "positional_dropout": ((16, 4, 0.1), {}),
    "positional_no_bias": ((16, 4, 0.0, False), {}),
    "positional_bias_kv_zero_attn": ((16, 4, 0.0, True, True, True), {}),
    "positional_kdim_vdim": ((16, 2, 0.0, True, False, False, 10, 14), {}),
    "positional_batch_first": ((16, 4, 0.0, True, False, False, None, None, True), {}),
    "keywords_kdim_vdim_batch_first": ((24, 3), dict(kdim=10, vdim=14, batch_first=True)),
    "keywords_bias_kv_batch_first": ((16, 2), dict(add_bias_kv=True, bias=False, batch_first=True)),
    "keywords_zero_attn_seq_first": ((16, 4), dict(add_zero_attn=True, batch_first=False)),
}
MASKS = [
    "none",
    "bool_2d",
    "float_3d",
    "padding_bool",
    "padding_and_mask_float",
    "causal_hint_top_left",  # torch's causal mask for Sq != Skv: query i sees keys j <= i
    "causal_hint_bottom_right",  # not what torch calls causal: torch's result depends on the path
    "causal_hint_float",
    "causal_hint_padding",
]
CALLS = {"weights_averaged": dict(), "weights_per_head": dict(average_attn_weights=False), "no_weights": dict(need_weights=False)}
B, SQ, SKV = 3, 5, 7
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def pair(form: str, dtype=torch.float64, seed: int = 1) -> tuple[nn.MultiheadAttention, MultiHeadAttention]:
    """torch's layer and ours from the same arguments, sharing random (non-zero bias) weights."""
    args, kwargs = FORMS[form]
    theirs = randomize_(nn.MultiheadAttention(*args, **kwargs), seed).to(dtype)
    ours = MultiHeadAttention(*args, **kwargs, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def inputs(module: nn.MultiheadAttention, dtype, seq_q: int = SQ, seq_kv: int = SKV, batch: int = B, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)

    def make(seq: int, features: int) -> torch.Tensor:
        x = torch.randn(batch, seq, features, generator=gen, dtype=torch.float64)
        return (x if module.batch_first else x.transpose(0, 1)).to(dtype)

    return make(seq_q, module.embed_dim), make(seq_kv, module.kdim), make(seq_kv, module.vdim)


def masks(kind: str, heads: int, dtype, seq_q: int = SQ, seq_kv: int = SKV) -> dict:
    """Forward kwargs in torch's convention (bool True = masked out); key 0 stays open so no row is empty."""
    gen = torch.Generator().manual_seed(3)
    blocked = torch.rand(seq_q, seq_kv, generator=gen) < 0.3
    blocked[:, 0] = False
    padding = torch.zeros(B, seq_kv, dtype=torch.bool)
    padding[1, -3:] = padding[2, -1] = True
    top_left = torch.ones(seq_q, seq_kv, dtype=torch.bool).triu(1)
    bottom_right = torch.ones(seq_q, seq_kv, dtype=torch.bool).triu(1 + seq_kv - seq_q)
    bottom_right[:, 0] = False

    def additive(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    return {
        "none": {},
        "bool_2d": {"attn_mask": blocked},
        "float_3d": {"attn_mask": additive((B * heads, seq_q, seq_kv))},
        "padding_bool": {"key_padding_mask": padding},
        "padding_and_mask_float": {"attn_mask": additive((seq_q, seq_kv)), "key_padding_mask": additive((B, seq_kv))},
        "causal_hint_top_left": {"attn_mask": top_left, "is_causal": True},
        "causal_hint_bottom_right": {"attn_mask": bottom_right, "is_causal": True},
        "causal_hint_float": {"attn_mask": additive((seq_q, seq_kv)), "is_causal": True},
        "causal_hint_padding": {"attn_mask": top_left, "is_causal": True, "key_padding_mask": padding},
    }[kind]


def assert_same(got: tuple, want: tuple, dtype) -> None:
    tol = TOLERANCE[dtype]
    assert (got[1] is None) == (want[1] is None)
    for ours, theirs in zip(got, want):
        if theirs is not None:
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
            torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)


@pytest.mark.parametrize("form", FORMS)
def test_constructor_matches_torch(form):
    """Same arguments -> same attributes, parameter names and (same seed) initial values."""
    args, kwargs = FORMS[form]
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(*args, **kwargs)
    torch.manual_seed(0)
    ours = MultiHeadAttention(*args, **kwargs)
    for name in ("embed_dim", "num_heads", "head_dim", "kdim", "vdim", "dropout", "batch_first", "add_zero_attn"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))


def test_defaults_and_keyword_only_extras():
    module = MultiHeadAttention(16, 4, 0.1, False, device="cpu", dtype=torch.float64)
    cfg = module.config
    assert (cfg.dropout, cfg.bias, cfg.batch_first, cfg.num_kv_heads, cfg.backend) == (0.1, False, False, 4, "auto")
    assert module.in_proj_weight.dtype == torch.float64 and module.in_proj_bias is None
    with pytest.raises(TypeError):  # attnkit's extras come after torch's arguments, by keyword only
        MultiHeadAttention(16, 4, 0.0, True, False, False, None, None, False, None, None, 2)
    assert MultiHeadAttention(16, 4, num_kv_heads=2, head_dim=8, backend="math").config.proj_sizes == (32, 16, 16)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("form", FORMS)
def test_forward_matches_torch(form, mask_kind):
    """Each form x mask, in fp32 and fp64, with weights averaged, per head, and without."""
    for dtype in TOLERANCE:
        theirs, ours = pair(form, dtype)
        theirs.eval(), ours.eval()
        query, key, value = inputs(theirs, dtype)
        for call in CALLS.values():
            kwargs = masks(mask_kind, theirs.num_heads, dtype) | call
            assert_same(ours(query, key, value, **kwargs), theirs(query, key, value, **kwargs), dtype)


@pytest.mark.parametrize("mask_kind", ["none", "causal_hint_top_left", "causal_hint_float", "causal_hint_padding"])
@pytest.mark.parametrize("form", ["defaults", "positional_bias_kv_zero_attn", "keywords_bias_kv_batch_first"])
def test_self_attention_square_matches_torch(form, mask_kind):
    """query is key is value, Sq == Skv: torch's SDPA ``is_causal`` path, and the op's causal kernels here."""
    theirs, ours = pair(form)
    x, _, _ = inputs(theirs, torch.float64, seq_q=6)
    for call in CALLS.values():
        kwargs = masks(mask_kind, theirs.num_heads, torch.float64, seq_q=6, seq_kv=6) | call
        assert_same(ours(x, x, x, **kwargs), theirs(x, x, x, **kwargs), torch.float64)


def test_causal_hint_is_not_applied_on_top_of_the_mask():
    """The mask alone decides: a row the non-square mask opens is not cut by a causal rule of attnkit's own."""
    theirs, ours = pair("defaults")
    query, key, value = inputs(theirs, torch.float64)
    open_mask = torch.zeros(SQ, SKV, dtype=torch.bool)  # every query may see every key
    out, weights = ours(query, key, value, attn_mask=open_mask, is_causal=True)
    torch.testing.assert_close(out, ours(query, key, value)[0], rtol=1e-12, atol=1e-12)
    assert (weights > 0).all()  # no row zeroed, no key cut


def test_is_causal_without_mask_is_bottom_right_where_torch_raises():
    """torch raises; attnkit applies its bottom-right causal mask (what a KV cache needs), equal to passing it."""
    theirs, ours = pair("defaults")
    query, key, value = inputs(theirs, torch.float64)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        theirs(query, key, value, is_causal=True)
    bottom_right = torch.ones(SQ, SKV, dtype=torch.bool).triu(1 + SKV - SQ)
    for need_weights in (True, False):
        want = theirs(query, key, value, attn_mask=bottom_right, need_weights=need_weights)
        assert_same(ours(query, key, value, is_causal=True, need_weights=need_weights), want, torch.float64)


def test_unbatched_matches_torch():
    theirs, ours = pair("positional_bias_kv_zero_attn")
    query, key, value = (t[:, 0] for t in inputs(theirs, torch.float64))  # (S, E)
    mask = masks("float_3d", theirs.num_heads, torch.float64)["attn_mask"][: theirs.num_heads]  # (H, Sq, Skv)
    padding = torch.zeros(SKV, dtype=torch.float64)
    padding[-2:] = float("-inf")  # float like the mask: torch deprecates mixing the two kinds
    for call in CALLS.values():
        kwargs = dict(attn_mask=mask, key_padding_mask=padding) | call
        assert_same(ours(query, key, value, **kwargs), theirs(query, key, value, **kwargs), torch.float64)


@pytest.mark.parametrize("form", ["positional_dropout", "keywords_kdim_vdim_batch_first"])
def test_train_and_eval_modes(form):
    """Training with dropout 0 and eval with dropout > 0 are deterministic: both equal torch."""
    args, kwargs = FORMS[form]
    for dropout, training in ((0.0, True), (0.3, False)):
        theirs = randomize_(nn.MultiheadAttention(args[0], args[1], dropout, **kwargs), 1).double().train(training)
        ours = MultiHeadAttention(args[0], args[1], dropout, **kwargs, dtype=torch.float64).train(training)
        ours.load_state_dict(theirs.state_dict())
        query, key, value = inputs(theirs, torch.float64)
        for call in CALLS.values():
            kwargs_ = masks("padding_bool", theirs.num_heads, torch.float64) | call
            assert_same(ours(query, key, value, **kwargs_), theirs(query, key, value, **kwargs_), torch.float64)


EMPTY = {"batch": dict(batch=0), "queries": dict(seq_q=0), "keys": dict(seq_kv=0)}


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("empty", EMPTY)
@pytest.mark.parametrize("form", ["defaults", "positional_kdim_vdim", "keywords_kdim_vdim_batch_first"])
def test_empty_inputs_match_torch(form, empty, need_weights):
    """B = 0, Sq = 0 or Skv = 0: torch's shapes and values (no key to attend: the output bias), and a backward."""
    theirs, ours = pair(form)
    query, key, value = inputs(theirs, torch.float64, **EMPTY[empty])
    want = theirs(query, key, value, need_weights=need_weights)
    leaves = [t.clone().requires_grad_() for t in (query, key, value)]
    got = ours(*leaves, need_weights=need_weights)
    assert_same(got, want, torch.float64)
    got[0].sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape and not t.grad.any() for t in leaves)
    if empty == "keys":  # the rows are real: output projection of zeros
        torch.testing.assert_close(got[0], ours.out_proj.bias.expand_as(got[0]))


def test_empty_batch_with_masks_and_unbatched_empty():
    theirs, ours = pair("keywords_kdim_vdim_batch_first")
    query, key, value = inputs(theirs, torch.float64, batch=0)
    padding = torch.zeros(0, SKV, dtype=torch.bool)
    out, weights = ours(query, key, value, key_padding_mask=padding, attn_mask=torch.zeros(0, SQ, SKV), average_attn_weights=False)
    assert out.shape == (0, SQ, 24) and weights.shape == (0, 3, SQ, SKV)
    want = theirs(query, key, value, key_padding_mask=padding)  # torch itself rejects this with need_weights=False
    assert_same(ours(query, key, value, key_padding_mask=padding), want, torch.float64)
    single = (query[0:0].new_zeros(0, 24), key.new_zeros(SKV, 10), value.new_zeros(SKV, 14))  # (S=0, E) unbatched
    assert_same(ours(*single), theirs(*single), torch.float64)


def _nan_pattern_backends() -> list[str]:
    return ["auto", *(name for name in BACKENDS if name not in ("cudnn", "efficient"))]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "padding"])
@pytest.mark.parametrize("where", ["query", "key"])
@pytest.mark.parametrize("backend", _nan_pattern_backends())
def test_nan_in_gives_nan_out_like_torch_math(backend, where, padded):
    """A NaN in ``query`` makes that query's row NaN, in ``key`` the whole batch element; the rest is exact.

    The reference is torch's math path (``need_weights=True``); torch's CPU fused kernel gives zeros instead.
    """
    theirs, _ = pair("positional_batch_first", torch.float32)
    ours = MultiHeadAttention(16, 4, batch_first=True, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    query, key, value = inputs(theirs, torch.float32)
    (query if where == "query" else key)[1, 2, 3] = float("nan")
    padding = torch.zeros(B, SKV, dtype=torch.bool)
    padding[1, -1] = True  # an open NaN key poisons every row (a masked one is the op's business)
    padding = padding if padded else None
    with torch.no_grad():
        want, _ = theirs(query, key, value, key_padding_mask=padding)
        for need_weights in (True, False):
            try:
                got, _ = ours(query, key, value, key_padding_mask=padding, need_weights=need_weights)
            except UnsupportedError as error:  # the op's own verdict that this backend cannot run here
                pytest.skip(f"{backend}: {error}")
            assert want.isnan().any(-1).sum() == (1 if where == "query" else SQ)
            rows = got.isnan().any(-1).nonzero().tolist(), want.isnan().any(-1).nonzero().tolist()
            assert torch.equal(got.isnan(), want.isnan()), f"need_weights={need_weights}: NaN rows {rows[0]}, torch {rows[1]}"
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_torch_fast_path_inputs_agree():
    """Eval + no_grad self-attention takes torch's fused ``_native_multi_head_attention``: same numbers."""
    theirs, ours = pair("positional_batch_first", torch.float32)
    theirs.eval(), ours.eval()
    x, _, _ = inputs(theirs, torch.float32, seq_q=6)
    padding = torch.zeros(B, 6, dtype=torch.bool)
    padding[0, -2:] = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kwargs in ({}, {"key_padding_mask": padding}, {"need_weights": False}):
            torch.testing.assert_close(ours(x, x, x, **kwargs)[0], theirs(x, x, x, **kwargs)[0], rtol=1e-5, atol=1e-5)
