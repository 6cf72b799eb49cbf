"""Finding attention layers by running the model, and forcing a backend for a whole model."""

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
