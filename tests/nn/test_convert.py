"""from_torch / to_torch / swap_attention against torch.nn.MultiheadAttention and nn.Transformer (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnkit.nn.multihead
from attnkit.errors import UnsupportedError
from attnkit.nn import MultiHeadAttention, disable_nested_tensor, from_torch, swap_attention, to_torch
from attnkit.utils import swap_modules
from mha_reference import randomize_

TORCH_CONFIGS = {
    "packed": dict(embed_dim=24, num_heads=4),
    "seq_first": dict(embed_dim=24, num_heads=4, batch_first=False),
    "kdim_vdim": dict(embed_dim=24, num_heads=2, kdim=10, vdim=14),
    "no_bias": dict(embed_dim=16, num_heads=2, bias=False),
    "bias_kv_zero_attn": dict(embed_dim=16, num_heads=4, add_bias_kv=True, add_zero_attn=True),
}
B, SQ, SKV = 3, 5, 7


def torch_mha(config: dict) -> nn.MultiheadAttention:
    config = {"batch_first": True} | config
    return randomize_(nn.MultiheadAttention(**config), seed=1).eval()


def inputs(module: nn.MultiheadAttention, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    shape = (lambda s, e: (B, s, e)) if module.batch_first else (lambda s, e: (s, B, e))
    return (
        torch.randn(shape(SQ, module.embed_dim), generator=gen),
        torch.randn(shape(SKV, module.kdim), generator=gen),
        torch.randn(shape(SKV, module.vdim), generator=gen),
    )


def masks(kind: str, heads: int) -> dict:
    gen = torch.Generator().manual_seed(3)
    blocked = torch.rand(SQ, SKV, generator=gen) < 0.3
    blocked[:, 0] = False
    padding = torch.zeros(B, SKV, dtype=torch.bool)
    padding[1, -3:] = True
    causal = torch.ones(SQ, SKV, dtype=torch.bool).triu(1 + SKV - SQ)  # torch: True = masked out
    return {
        "none": {},
        "padding": {"key_padding_mask": padding},
        "bool_2d": {"attn_mask": blocked},
        "float_3d": {"attn_mask": torch.randn(B * heads, SQ, SKV, generator=gen)},
        "float_both": {"attn_mask": torch.randn(SQ, SKV, generator=gen), "key_padding_mask": torch.randn(B, SKV, generator=gen)},
        "causal_hint": {"attn_mask": causal, "is_causal": True, "key_padding_mask": padding},
    }[kind]


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "bool_2d", "float_3d", "float_both", "causal_hint"])
@pytest.mark.parametrize("name", TORCH_CONFIGS)
def test_from_torch_matches_torch(name, mask_kind, need_weights):
    original = torch_mha(TORCH_CONFIGS[name])
    converted = from_torch(original)
    query, key, value = inputs(original)
    kwargs = masks(mask_kind, original.num_heads) | {"need_weights": need_weights}
    expected, expected_weights = original(query, key, value, **kwargs)
    out, weights = converted(query, key, value, **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if need_weights:
        torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-5)
    else:
        assert weights is None


def _grads(module, dtype, query, key, value, kwargs) -> list[torch.Tensor]:
    module = module.to(dtype)
    leaves = [t.to(dtype).clone().requires_grad_() for t in (query, key, value)]
    out, weights = module(*leaves, **{k: v.to(dtype) for k, v in kwargs.items()})
    (out.square().sum() + weights.sum()).backward()
    return [t.grad.double() for t in leaves] + [p.grad.double() for p in module.parameters()]


@pytest.mark.parametrize("name", ["packed", "kdim_vdim", "bias_kv_zero_attn"])
def test_gradients_match_torch(name):
    """fp32 gradients stay within 2x torch's own fp32 drift from torch in float64 (k = 2, as for the ops)."""
    query, key, value = inputs(torch_mha(TORCH_CONFIGS[name]))
    kwargs = masks("float_both", torch_mha(TORCH_CONFIGS[name]).num_heads)
    truth = _grads(torch_mha(TORCH_CONFIGS[name]), torch.float64, query, key, value, kwargs)
    torch_fp32 = _grads(torch_mha(TORCH_CONFIGS[name]), torch.float32, query, key, value, kwargs)
    ours_fp32 = _grads(from_torch(torch_mha(TORCH_CONFIGS[name])), torch.float32, query, key, value, kwargs)
    for want, theirs, ours in zip(truth, torch_fp32, ours_fp32):
        drift = (theirs - want).abs().max().item()
        assert (ours - want).abs().max().item() <= 2 * drift + 1e-6


def test_from_torch_shares_parameters_and_state_dict():
    original = torch_mha(TORCH_CONFIGS["kdim_vdim"])
    converted = from_torch(original, backend="reference")
    assert all(a is b for a, b in zip(original.parameters(), converted.parameters()))
    assert list(original.state_dict()) == list(converted.state_dict())
    assert converted.config.backend == "reference" and not converted.training


@pytest.mark.parametrize("name", TORCH_CONFIGS)
def test_same_seed_same_initial_weights_as_torch(name):
    torch.manual_seed(0)
    original = nn.MultiheadAttention(**TORCH_CONFIGS[name])
    torch.manual_seed(0)
    ours = MultiHeadAttention(**TORCH_CONFIGS[name])
    assert list(original.state_dict()) == list(ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), ours.state_dict().values()))


@pytest.mark.parametrize("name", TORCH_CONFIGS)
def test_to_torch_roundtrip(name):
    torch.manual_seed(0)
    ours = randomize_(MultiHeadAttention(**TORCH_CONFIGS[name]), seed=4)
    back = to_torch(ours)
    query, key, value = inputs(back)
    torch.testing.assert_close(ours(query, key, value)[0], back(query, key, value)[0], rtol=1e-5, atol=1e-5)
    assert all(a is b for a, b in zip(ours.parameters(), back.parameters()))


def test_to_torch_names_what_torch_lacks():
    ours = MultiHeadAttention(24, 4, num_kv_heads=2, head_dim=5, v_head_dim=3, scale=0.5)
    with pytest.raises(UnsupportedError) as raised:
        to_torch(ours)
    for feature in ("num_kv_heads=2", "head_dim=5", "v_head_dim=3", "scale=0.5"):
        assert feature in str(raised.value)


@pytest.fixture
def attend_calls(monkeypatch):
    """Counts calls into attnkit's attention core (proves torch's fused fast paths did not bypass it)."""
    calls = []
    original = attnkit.nn.multihead.attend
    monkeypatch.setattr(attnkit.nn.multihead, "attend", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


# torch's own warnings about its nested-tensor path, which the original (unswapped) model takes.
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True", "ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_swap_in_nn_transformer(training, batch_first, attend_calls):
    torch.manual_seed(5)
    model = nn.Transformer(
        d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=48, dropout=0.0, batch_first=batch_first
    )
    model.train(training)
    src, tgt = torch.randn(B, 9, 32), torch.randn(B, 6, 32)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    padding = torch.zeros(B, 9, dtype=torch.bool)
    padding[0, -4:] = True  # right padding: the eval-mode encoder would switch to nested tensors
    kwargs = dict(
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(6),
        tgt_is_causal=True,
        src_key_padding_mask=padding,
        memory_key_padding_mask=padding,
    )
    with torch.no_grad():
        expected = model(src, tgt, **kwargs)
        swapped = swap_attention(model)
        out = swapped(src, tgt, **kwargs)
    assert swapped is model
    assert sum(isinstance(m, MultiHeadAttention) for m in model.modules()) == 6 and len(attend_calls) == 6
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_swap_filter_gets_module_and_fqn_and_eval_encoder(attend_calls):
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=48, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, num_layers=2), nn.TransformerEncoder(layer, num_layers=1)).eval()
    x = torch.randn(B, 8, 32)
    seen = []

    def only_first(module, fqn):
        seen.append(fqn)
        return fqn.startswith("0.")

    with torch.no_grad():
        expected = model(x)
        swap_attention(model, module_filter_fn=only_first, backend="math")
        out = model(x)
    assert seen == ["0.layers.0.self_attn", "0.layers.1.self_attn", "1.layers.0.self_attn"]
    kinds = [type(m.self_attn) for m in (*model[0].layers, *model[1].layers)]
    assert kinds == [MultiHeadAttention, MultiHeadAttention, nn.MultiheadAttention]
    assert len(attend_calls) == 2 and model[0].use_nested_tensor is False
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_swap_root_module_returns_converted():
    root = nn.MultiheadAttention(16, 2)
    assert isinstance(swap_attention(root), MultiHeadAttention)


def _encoder_with_padding():
    torch.manual_seed(7)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=48, dropout=0.0, batch_first=True)
    model = nn.ModuleList([nn.TransformerEncoder(layer, num_layers=2), nn.TransformerEncoder(layer, num_layers=1)]).eval()
    x = torch.randn(B, 8, 32)
    padding = torch.zeros(B, 8, dtype=torch.bool)
    padding[0, -3:] = True  # right padding: torch packs the batch into a nested tensor in eval mode
    return model, x, padding


def _encode(model: nn.ModuleList, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    for encoder in model:
        x = encoder(x, src_key_padding_mask=padding)
    return x


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True", "ignore:The PyTorch API of nested tensors")
def test_swap_of_a_later_layer_turns_off_nested_tensors(attend_calls):
    """Only layer 1 swapped: layer 0 still qualifies torch's nested path, which would feed us a nested tensor."""
    model, x, padding = _encoder_with_padding()
    with torch.no_grad():
        expected = _encode(model, x, padding)
        swap_attention(model, module_filter_fn=lambda module, fqn: fqn == "0.layers.1.self_attn")
        out = _encode(model, x, padding)
    assert model[0].use_nested_tensor is False and model[1].use_nested_tensor is True  # torch-only encoder keeps it
    assert len(attend_calls) == 1
    real = ~padding[..., None]  # torch's nested path leaves padded positions at 0
    torch.testing.assert_close(out * real, expected * real, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True", "ignore:The PyTorch API of nested tensors")
def test_disable_nested_tensor_is_what_makes_a_swap_safe():
    """Planted fault: the bare swap, without disable_nested_tensor, breaks on the nested path."""
    model, x, padding = _encoder_with_padding()
    swap_modules(model, lambda module, fqn: fqn == "0.layers.1.self_attn", lambda module, fqn: from_torch(module))
    with torch.no_grad(), pytest.raises(RuntimeError, match="NestedTensor"):
        _encode(model, x, padding)
    assert disable_nested_tensor(model) == ["0"] and disable_nested_tensor(model) == []
    with torch.no_grad():
        assert _encode(model, x, padding).shape == x.shape


def test_swap_keeps_shared_attention_shared():
    shared = nn.MultiheadAttention(16, 2)
    model = nn.ModuleDict({"a": nn.ModuleList([shared]), "b": nn.ModuleList([shared])})
    swap_attention(model)
    assert isinstance(model["a"][0], MultiHeadAttention) and model["a"][0] is model["b"][0]
