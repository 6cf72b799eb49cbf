"""Finding attention layers by running the model, and forcing a backend for a whole model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnkit.validate import find_layers, force_backend
from attnkit.validate.accuracy import model_output
from planted import TinyDecoder, dropped_mask, tiny_inputs


def test_finds_sdpa_layers_with_real_shapes():
    x, padding = tiny_inputs(batch=2, seq=24)
    layers = find_layers(TinyDecoder(), (x, padding))
    assert len(layers) == 2 and all(layer.names == ["<model>"] and layer.kind == "sdpa" for layer in layers)
    masked, causal = (layer.attention_spec for layer in layers)
    assert (masked.mask, masked.causal, masked.heads_kv, masked.seq_q) == ("bool", False, 4, 24)
    assert (causal.mask, causal.causal, causal.heads_q, causal.heads_kv, causal.head_dim) == ("none", True, 4, 2, 8)


class _TwoMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.fused = nn.MultiheadAttention(16, 2, batch_first=True)
        self.weights = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        x = self.fused(x, x, x, need_weights=False)[0]
        return self.weights(x, x, x)[0]  # need_weights defaults to True


def test_multihead_attention_need_weights_is_a_blocker():
    layers = {layer.names[0]: layer for layer in find_layers(_TwoMHA().eval(), (torch.randn(2, 5, 16),))}
    assert layers["fused"].blockers == [] and layers["fused"].kind == "nn.MultiheadAttention"
    assert "need_weights=True" in layers["weights"].blockers[0]
    assert layers["weights"].attention_spec.heads_q == 2 and layers["weights"].attention_spec.head_dim == 8


def test_force_backend_routes_every_call_and_restores_sdpa():
    model, inputs = TinyDecoder(), tiny_inputs()
    default = model_output(model, inputs, {}, torch.float32)
    assert torch.allclose(model_output(model, inputs, {}, torch.float32, "math"), default, atol=1e-5)
    assert not torch.allclose(model_output(model, inputs, {}, torch.float32, dropped_mask), default, atol=1e-3)
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert torch.backends.mha.get_fastpath_enabled()


def test_force_backend_restores_after_an_error():
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    model, inputs = TinyDecoder(), tiny_inputs()
    try:
        with force_backend(broken):
            model(*inputs)
    except RuntimeError:
        pass
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention


_bound_at_import = F.scaled_dot_product_attention  # what `from torch.nn.functional import ...` binds


class _BoundAtImport(nn.Module):
    """Calls SDPA through a name bound when its module was imported: patching ``F`` never reaches it."""

    def forward(self, q, k, v):
        return _bound_at_import(q, k, v, is_causal=True)


def test_sdpa_bound_at_import_is_found_and_routed():
    q, k, v = (torch.randn(2, 4, 7, 8) for _ in range(3))
    layers = find_layers(_BoundAtImport(), (q, k, v))
    assert [(layer.names, layer.kind) for layer in layers] == [(["<model>"], "sdpa")]
    assert (layers[0].attention_spec.causal, layers[0].attention_spec.seq_q) == (True, 7)
    calls = []

    def spy(q, k, v, **options):
        calls.append(options["causal"])
        return torch.zeros_like(q)

    with torch.no_grad(), force_backend(spy):
        out = _BoundAtImport()(q, k, v)
    assert calls == [True] and not out.any()  # the forced backend's output, not SDPA's


@pytest.mark.skipif(not hasattr(torch.overrides, "redispatch_function"),
                    reason=f"torch {torch.__version__} has no torch.overrides.redispatch_function (see the next test)")
def test_multihead_attention_calls_are_routed_without_global_flags():
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        default = mha(x, x, x, need_weights=False)[0]
        with force_backend("reference"):
            assert torch.backends.mha.get_fastpath_enabled()  # nothing global is flipped
            forced = mha(x, x, x, need_weights=False)[0]
        padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])  # True = ignore this key
        with force_backend(dropped_mask):  # a planted fault must change the output: the calls really go there
            dropped = mha(x, x, x, need_weights=False, key_padding_mask=padding)[0]
        expected = mha(x, x, x, need_weights=False, key_padding_mask=padding)[0]
    torch.testing.assert_close(forced, default, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dropped[0], expected[0], atol=1e-5, rtol=1e-5)  # nothing padded: same
    assert not torch.allclose(dropped[1], expected[1], atol=1e-3)


def test_an_older_torch_without_redispatch_says_so(monkeypatch):
    from attnkit.discover import runtime
    from attnkit.errors import UnsupportedError

    monkeypatch.setattr(runtime, "_REDISPATCH", None)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with pytest.raises(UnsupportedError, match="multi_head_attention_forward"), torch.no_grad():
        with force_backend("math"):
            mha(x, x, x, need_weights=False)
