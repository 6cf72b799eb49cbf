"""`optimize` on torch's nn.TransformerEncoder / nn.Transformer with a padding mask (eval: nested tensors)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnkit.nn import MultiHeadAttention
from attnkit.optimize import OptimizeConfig, optimize

_TOL = dict(rtol=1e-5, atol=1e-5)  # fp32, 2 layers of width 32: observed errors ~5e-7


def _padding(batch=3, seq=7):
    """True = padding; row 0 full, row 1 loses 2 tokens, row 2 keeps 3 (right padding, as the nested path needs)."""
    pad = torch.zeros(batch, seq, dtype=torch.bool)
    pad[1, seq - 2 :] = True
    pad[2, 3:] = True
    return pad


def _encoder(nested: bool, dropout: float = 0.1):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=dropout, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).eval()


@pytest.mark.parametrize("nested", [True, False])
def test_encoder_with_padding(nested):
    model = _encoder(nested)
    x, pad = torch.randn(3, 7, 32), _padding()
    with torch.no_grad():
        expected = model(x, src_key_padding_mask=pad)
    assert (expected[pad] == 0).all() == nested  # the nested path zeroes padded positions
    optimized, report = optimize(model, (x,), example_kwargs={"src_key_padding_mask": pad}, config=OptimizeConfig(measure=False))
    assert report.passed and report.kept, [c for c in report.checks if not c.passed]
    assert sum(isinstance(m, MultiHeadAttention) for m in optimized.modules()) == 2
    assert not optimized.use_nested_tensor and all("nested-tensor" in r.detail for r in report.rewrites)
    with torch.no_grad():
        got = optimized(x, src_key_padding_mask=pad)
    torch.testing.assert_close(got[~pad], expected[~pad], **_TOL)  # valid positions: the same
    if not nested:
        torch.testing.assert_close(got, expected, **_TOL)  # padded ones too, where the original computes them
    unpadded = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(optimized(unpadded), model(unpadded), **_TOL)


def test_planted_fault_padding_ignored_is_caught():
    """Dropping the padding mask changes valid positions too: the comparison above would see it."""
    model = _encoder(True)
    x, pad = torch.randn(3, 7, 32), _padding()
    optimized, _ = optimize(model, (x,), example_kwargs={"src_key_padding_mask": pad}, config=OptimizeConfig(check=False, measure=False))
    with torch.no_grad():
        wrong, expected = optimized(x), model(x, src_key_padding_mask=pad)
    assert (wrong[~pad] - expected[~pad]).abs().max() > 1e-2


def test_transformer_with_padding_masks():
    torch.manual_seed(0)
    model = nn.Transformer(32, 4, 2, 2, 64, dropout=0.1, batch_first=True).eval()
    src, tgt = torch.randn(3, 7, 32), torch.randn(3, 5, 32)
    pad, tgt_pad = _padding(), _padding(3, 5)
    kwargs = {
        "src_key_padding_mask": pad, "tgt_key_padding_mask": tgt_pad, "memory_key_padding_mask": pad,
        "tgt_mask": nn.Transformer.generate_square_subsequent_mask(5).bool(),
    }  # fmt: skip
    with torch.no_grad():
        expected = model(src, tgt, **kwargs)
    optimized, report = optimize(model, (src, tgt), example_kwargs=kwargs, config=OptimizeConfig(measure=False))
    assert report.passed and report.kept, [c for c in report.checks if not c.passed]
    assert sum(isinstance(m, MultiHeadAttention) for m in optimized.modules()) == 2 + 2 * 2
    with torch.no_grad():
        got = optimized(src, tgt, **kwargs)
    torch.testing.assert_close(got[~tgt_pad], expected[~tgt_pad], **_TOL)


def test_training_mode_with_padding_matches_everywhere():
    """Train mode never takes the nested path: every position (dropout off) and the gradients match."""
    model = _encoder(True, dropout=0.0)
    x, pad = torch.randn(3, 7, 32), _padding()
    optimized, _ = optimize(model, (x,), example_kwargs={"src_key_padding_mask": pad}, config=OptimizeConfig(check=False, measure=False))
    outputs = []
    for m in (model, optimized):
        m.train()
        out = m(x, src_key_padding_mask=pad)
        out.square().sum().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], **_TOL)
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name, param in optimized.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-5, msg=name)
