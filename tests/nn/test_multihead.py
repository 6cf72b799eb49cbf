"""MultiHeadAttention against an independent float64 reference: configs x masks x dtypes, gradients,
exact query chunking, dropout, layouts."""

from __future__ import annotations

import pytest
import torch

from attnkit.nn import MultiHeadAttention
from mha_reference import randomize_, reference_mha

# Awkward on purpose: odd sizes, heads that do not tile embed_dim, d_k != d_v, Sq != Skv.
CONFIGS = {
    "self": dict(embed_dim=24, num_heads=3),
    "gqa": dict(embed_dim=32, num_heads=4, num_kv_heads=2),
    "mqa": dict(embed_dim=30, num_heads=6, num_kv_heads=1),
    "dk_ne_dv": dict(embed_dim=20, num_heads=2, head_dim=7, v_head_dim=5),
    "cross_kdim_vdim": dict(embed_dim=24, num_heads=2, kdim=11, vdim=13),
    "bias_kv_zero_attn": dict(embed_dim=16, num_heads=2, add_bias_kv=True, add_zero_attn=True),
    "no_bias_scale": dict(embed_dim=16, num_heads=4, bias=False, scale=0.3),
}
MASKS = ["none", "bool_2d", "float_3d", "bool_4d", "padding", "causal", "causal_padding_float"]
BATCH, SEQ_Q, SEQ_KV = 3, 5, 7
# fp32 against the fp64 reference; plain fp32 rounding on these sizes stays below 1e-6.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_inputs(module: MultiHeadAttention, seed: int, seq_q: int = SEQ_Q, seq_kv: int = SEQ_KV, batch: int = BATCH):
    cfg, generator = module.config, torch.Generator().manual_seed(seed)
    query = torch.randn(batch, seq_q, cfg.embed_dim, generator=generator, dtype=torch.float64)
    key = torch.randn(batch, seq_kv, cfg.kdim, generator=generator, dtype=torch.float64)
    value = torch.randn(batch, seq_kv, cfg.vdim, generator=generator, dtype=torch.float64)
    return query, key, value


def make_masks(kind: str, heads: int, seq_q: int, seq_kv: int, seed: int) -> dict:
    """Forward kwargs in torch's convention (bool True = masked out); key 0 stays open so no row is empty."""
    generator = torch.Generator().manual_seed(seed)
    drop = torch.rand(BATCH, heads, seq_q, seq_kv, generator=generator) < 0.3
    drop[..., 0] = False
    padding = torch.zeros(BATCH, seq_kv, dtype=torch.bool)
    padding[0, -2:] = padding[2, -1] = True
    return {
        "none": {},
        "bool_2d": {"attn_mask": drop[0, 0]},
        "float_3d": {"attn_mask": torch.randn(BATCH * heads, seq_q, seq_kv, generator=generator, dtype=torch.float64)},
        "bool_4d": {"attn_mask": drop[:, :1]},
        "padding": {"key_padding_mask": padding},
        "causal": {"is_causal": True},
        "causal_padding_float": {"is_causal": True, "key_padding_mask": torch.zeros(BATCH, seq_kv).masked_fill(padding, -1e9)},
    }[kind]


def build(config: dict, dtype=torch.float64, **overrides) -> MultiHeadAttention:
    overrides = {"batch_first": True} | overrides
    return randomize_(MultiHeadAttention(**config, **overrides, dtype=torch.float64), seed=1).to(dtype)


def cast(masks: dict, dtype) -> dict:
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in masks.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("name", CONFIGS)
def test_matches_reference(name, mask_kind, dtype):
    module = build(CONFIGS[name], dtype, backend="math")
    query, key, value = make_inputs(module, seed=2)
    masks = make_masks(mask_kind, module.num_heads, SEQ_Q, SEQ_KV, seed=3)
    expected_out, expected_weights = reference_mha(module, query, key, value, **masks)
    out, weights = module(query.to(dtype), key.to(dtype), value.to(dtype), average_attn_weights=False, **cast(masks, dtype))
    fast, none = module(query.to(dtype), key.to(dtype), value.to(dtype), need_weights=False, **cast(masks, dtype))
    tol = TOLERANCE[dtype]
    assert none is None and out.dtype == dtype and out.shape == (BATCH, SEQ_Q, module.embed_dim)
    torch.testing.assert_close(out.double(), expected_out, rtol=tol, atol=tol)
    torch.testing.assert_close(fast.double(), expected_out, rtol=tol, atol=tol)
    torch.testing.assert_close(weights.double(), expected_weights, rtol=tol, atol=tol)


def test_key_and_value_defaults_and_packed_projection():
    module = build(CONFIGS["gqa"])
    query, key, _ = make_inputs(module, seed=4, seq_q=6)
    expected, _ = reference_mha(module, query, query, query, is_causal=True)
    out, _ = module(query, need_weights=False, is_causal=True)  # key = value = query
    assert module.in_proj_weight.shape == (32 + 2 * 16, 32) and module.q_proj_weight is None
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    cross, _ = reference_mha(module, query, key, key)
    torch.testing.assert_close(module(query, key)[0], cross, rtol=1e-10, atol=1e-10)  # value = key


def test_packed_self_attention_gradients_split_by_features_first():
    """Under autograd the packed projection is split by features, then into heads: its backward is one cat of
    (B, S, features) gradients (the heads-first split's cost a ViT-B/16 training step 1.7 ms on an H100, see
    ``MultiHeadAttention._project``); without autograd the heads-first split (fewer ops) runs. Same gradients."""
    module = build(CONFIGS["gqa"])
    query, _, _ = make_inputs(module, seed=7, seq_q=6)
    query.requires_grad_()
    assert all(t.grad_fn.name().startswith("TransposeBackward") for t in module._project(query, query, query, True))
    with torch.no_grad():
        assert all(t.grad_fn is None for t in module._project(query, query, query, True))
    grad_out = torch.randn(*query.shape[:2], module.embed_dim, dtype=torch.float64)

    def grads(out):
        module.zero_grad()
        (out * grad_out).sum().backward()
        found = [query.grad, *(p.grad for p in module.parameters())]
        query.grad = None
        return found

    ours = grads(module(query, need_weights=False, is_causal=True)[0])
    expected = grads(reference_mha(module, query, query, query, is_causal=True)[0])
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("backend", ["reference", "math", "auto"])
@pytest.mark.parametrize("name", ["gqa", "dk_ne_dv", "bias_kv_zero_attn"])
def test_gradients_match_reference(name, backend):
    module = build(CONFIGS[name], backend=backend)
    query, key, value = (t.requires_grad_() for t in make_inputs(module, seed=5))
    masks = make_masks("causal_padding_float", module.num_heads, SEQ_Q, SEQ_KV, seed=6)
    grad_out = torch.randn(BATCH, SEQ_Q, module.embed_dim, dtype=torch.float64)

    def grads(run):
        module.zero_grad()
        (run() * grad_out).sum().backward()
        found = [query.grad, key.grad, value.grad, *(p.grad for p in module.parameters())]
        query.grad = key.grad = value.grad = None
        return found

    ours = grads(lambda: module(query, key, value, need_weights=False, **masks)[0])
    expected = grads(lambda: reference_mha(module, query, key, value, **masks)[0])
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("seq_q, seq_kv", [(9, 9), (9, 4), (3, 11)])
@pytest.mark.parametrize("mask_kind", ["causal", "causal_padding_float", "float_3d"])
def test_query_chunking_is_exact(seq_q, seq_kv, mask_kind):
    whole = build(CONFIGS["gqa"], backend="math")
    chunked = build(CONFIGS["gqa"], backend="math", query_chunk_size=2)
    query, key, value = make_inputs(whole, seed=7, seq_q=seq_q, seq_kv=seq_kv)
    masks = make_masks(mask_kind, whole.num_heads, seq_q, seq_kv, seed=8)
    expected, expected_weights = reference_mha(whole, query, key, value, **masks)
    for module in (whole, chunked):
        out, weights = module(query, key, value, average_attn_weights=False, **masks)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(weights, expected_weights, rtol=1e-10, atol=1e-10)
    if seq_q > seq_kv and mask_kind == "causal":  # the first rows see no key: zeros, as the op's contract
        assert (weights[:, :, : seq_q - seq_kv] == 0).all()


def test_dropout_mask_reproduces_and_eval_disables():
    module = build(CONFIGS["mqa"], dropout=0.25, backend="math").train()
    query, key, value = make_inputs(module, seed=9)
    keep = torch.rand(BATCH, module.num_heads, SEQ_Q, SEQ_KV, generator=torch.Generator().manual_seed(10)) >= 0.25
    expected, expected_weights = reference_mha(module, query, key, value, dropout_mask=keep)
    out, weights = module(query, key, value, dropout_mask=keep, average_attn_weights=False)
    fast, _ = module(query, key, value, dropout_mask=keep, need_weights=False)
    for got, want in ((out, expected), (fast, expected), (weights, expected_weights)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    random_a, random_b = module(query, key, value)[0], module(query, key, value)[0]
    assert not torch.allclose(random_a, random_b)
    no_dropout, _ = reference_mha(module, query, key, value)
    torch.testing.assert_close(module.eval()(query, key, value)[0], no_dropout, rtol=1e-10, atol=1e-10)


def test_layouts_unbatched_and_averaged_weights():
    first = build(CONFIGS["cross_kdim_vdim"])
    seq_first = build(CONFIGS["cross_kdim_vdim"], batch_first=False)
    query, key, value = make_inputs(first, seed=11)
    expected, expected_weights = reference_mha(first, query, key, value)
    out, weights = seq_first(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1))
    torch.testing.assert_close(out.transpose(0, 1), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights, expected_weights.mean(1), rtol=1e-10, atol=1e-10)
    single, single_weights = first(query[1], key[1], value[1], average_attn_weights=False)
    torch.testing.assert_close(single, expected[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(single_weights, expected_weights[1], rtol=1e-10, atol=1e-10)


def test_fully_masked_rows_give_zeros():
    module = build(CONFIGS["self"], bias=False)
    query, key, value = make_inputs(module, seed=12)
    blocked = torch.zeros(SEQ_Q, SEQ_KV, dtype=torch.bool)
    blocked[1] = True
    out, weights = module(query, key, value, attn_mask=blocked)
    assert torch.isfinite(out).all() and (out[:, 1] == 0).all() and (weights[:, 1] == 0).all()


def test_repr_and_config_roundtrip():
    module = MultiHeadAttention(20, 2, kdim=3, head_dim=7, v_head_dim=5)
    assert "v_head_dim=5" in repr(module) and "packed=False" in repr(module) and "batch_first=False" in repr(module)
    assert MultiHeadAttention.from_config(module.config).config == module.config
