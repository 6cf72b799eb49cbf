"""Float8Linear numerics against fp64 (SQNR floors), the real CPU _scaled_mm path, overflow, compile.

SQNR floors (dB, vs an fp64 nn.Linear; bf16 activations; M x K x N = 256 x 384 x 256, seed 0):
tensorwise / delayed (E4M3 fwd, E5M2 grads): output >= 25, input and weight gradient >= 22
(E5M2 keeps 2 mantissa bits: ~25 dB is its ceiling). rowwise / blockwise (E4M3 everywhere):
output >= 28, gradients >= 27. rowwise_with_gw_hp: weight gradient >= 40 (bf16 GEMM).
A plain bf16 matmul of the same data reaches ~47 dB (asserted as the ceiling the floors sit under).
"""

import pytest
import torch
from torch import nn

from attnkit.errors import UnsupportedError
from attnkit.fp8 import Float8Linear, Float8TrainingConfig, native_blockwise_support, native_support, sqnr
from attnkit.fp8 import scaling
from fp8_helpers import EMULATED_FLOOR_DB, bf16_linear_sqnr, fwd_bwd_per_mode, reference_and_fp8

M, K, N = 256, 384, 256
FLOORS = {
    "tensorwise": {"out": 25, "grad_input": 22, "grad_weight": 22},
    "delayed": {"out": 25, "grad_input": 22, "grad_weight": 22},
    "rowwise": {"out": 28, "grad_input": 27, "grad_weight": 27},
    "rowwise_with_gw_hp": {"out": 28, "grad_input": 27, "grad_weight": 40},
    "blockwise": {"out": 28, "grad_input": 27, "grad_weight": 27},
}
NATIVE_CPU = ["tensorwise", "delayed", "rowwise", "rowwise_with_gw_hp"]  # CPU _scaled_mm: tensor/row scales
# torch 2.11's CPU _scaled_mm takes per-tensor scales only (rowwise: an internal assert); 2.13's takes both
CPU_ROWWISE = native_support("cpu", scaling.Granularity.ROW)


def _config(name, **kw):
    """The recipe's config; rowwise on a CPU without rowwise _scaled_mm is emulated (the same quantisation)."""
    emulate = kw.pop("emulate", False) or (name.startswith("rowwise") and CPU_ROWWISE is not None)
    return Float8TrainingConfig.from_recipe_name(name, emulate=emulate, **kw)


@pytest.mark.parametrize("name", list(FLOORS))
def test_sqnr_floors(name):
    got = reference_and_fp8(_config(name, emulate=name == "blockwise"), M, K, N)
    for key, floor in FLOORS[name].items():
        assert got[key] >= floor, (key, got)
    assert got["grad_bias"] >= 40  # bias gradient is a bf16 sum, no FP8
    assert bf16_linear_sqnr(M, K, N) > max(FLOORS[name].values()) + 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NATIVE_CPU)
def test_cpu_scaled_mm_matches_emulation(name, dtype):
    # torch's CPU _scaled_mm runs tensorwise (and, from 2.13, rowwise) FP8 GEMMs: the real path equals the
    # upcast math, roundings included (bf16 activations with an fp32 bias: the bias is added after the bf16
    # rounding). torch 2.11's oneDNN path rounds a bf16 result differently now and then: one bf16 ulp allowed.
    if name.startswith("rowwise") and CPU_ROWWISE is not None:
        pytest.skip(f"no rowwise _scaled_mm on this CPU: {CPU_ROWWISE}")
    got = fwd_bwd_per_mode(name, ("eager", "emulate"), device="cpu", shape=(64, 128), out_features=48, dtype=dtype)
    tolerance = 2.0**-7 if dtype == torch.bfloat16 and torch.__version__ < "2.13" else 1e-5
    for real, emulated in zip(got["eager"], got["emulate"]):
        torch.testing.assert_close(real, emulated, rtol=tolerance, atol=1e-5)


def test_planted_scale_mismatch_breaks_real_vs_emulated(monkeypatch):
    # the GPU test's comparison (same x, same upstream gradient) must see a 1% wrong dequantisation scale
    # in the real path (40 dB, under the floor); like with like agrees exactly on CPU
    real_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, *, scale_a, scale_b, **kw: real_mm(
        a, b, scale_a=scale_a, scale_b=scale_b * 1.01, **kw))
    got = fwd_bwd_per_mode("tensorwise", ("eager", "emulate"), device="cpu", shape=(64, 128), out_features=48)
    for real, emulated in zip(got["eager"], got["emulate"]):
        assert 35 < sqnr(emulated, real) < EMULATED_FLOOR_DB


def test_blockwise_on_cpu_requires_emulate():
    assert native_blockwise_support("cpu") is not None
    with pytest.raises(UnsupportedError, match="emulate=True"):
        Float8Linear.from_float(nn.Linear(128, 128), _config("blockwise"))


def test_rowwise_where_scaled_mm_takes_only_tensor_scales_requires_emulate(monkeypatch):
    # torch 2.11's CPU _scaled_mm asserts on row scales: the layer must say so at conversion, not mid-step
    import attnkit.fp8.linear as linear_module

    monkeypatch.setattr(linear_module, "native_support", lambda device, granularity: "cpu: only per-tensor scaling")
    for name in ("rowwise", "rowwise_with_gw_hp"):
        with pytest.raises(UnsupportedError, match=f"{name} FP8 GEMMs do not run natively here .*emulate=True"):
            Float8Linear.from_float(nn.Linear(128, 128), Float8TrainingConfig.from_recipe_name(name))
    Float8Linear.from_float(nn.Linear(128, 128), Float8TrainingConfig.from_recipe_name("tensorwise"))  # not probed
    Float8Linear.from_float(nn.Linear(128, 128), Float8TrainingConfig.from_recipe_name("rowwise", emulate=True))


def test_misaligned_features_refused_and_ragged_tokens_fall_back():
    with pytest.raises(UnsupportedError, match="divisible by 16"):
        Float8Linear.from_float(nn.Linear(100, 64), Float8TrainingConfig())
    layer = Float8Linear.from_float(nn.Linear(64, 32), Float8TrainingConfig())
    x = torch.randn(3, 7, 64)  # 21 tokens: not a multiple of 16 -> plain F.linear
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    assert layer(torch.randn(2, 8, 64)).shape == (2, 8, 32)


@pytest.mark.parametrize("name", NATIVE_CPU + ["blockwise"])
def test_all_zero_input_and_outlier_rows_stay_finite(name):
    config = _config(name, emulate=name == "blockwise")
    layer = Float8Linear.from_float(nn.Linear(128, 128), config)
    x = torch.randn(128, 128)
    x[:64] = 0.0
    x[64:72] *= 1e4  # 1e4x outliers
    xi = x.clone().requires_grad_()
    out = layer(xi)
    out.backward(torch.randn_like(out))
    for t in (out, xi.grad, layer.weight.grad):
        assert torch.isfinite(t).all()
    assert (out[:64] == layer.bias).all()  # zero rows: exactly the bias
    zero = torch.zeros(128, 128, requires_grad=True)
    layer(zero).sum().backward()
    assert torch.isfinite(zero.grad).all() and torch.isfinite(layer.weight.grad).all()
    assert layer.fp8_overflow_counts.tolist() == [0, 0, 0]


@pytest.mark.parametrize("name", ["tensorwise", "rowwise", "delayed"])
def test_planted_inf_is_counted_and_propagated(name):
    layer = Float8Linear.from_float(nn.Linear(64, 64), _config(name))
    x = torch.randn(32, 64)
    x[5, 3] = float("inf")
    xi = x.requires_grad_()
    out = layer(xi)
    assert layer.fp8_overflow_counts.tolist() == [1, 0, 0]
    assert not torch.isfinite(out).all()  # overflow is visible, not saturated away
    grad = torch.randn(32, 64)
    grad[0, 0] = float("nan")
    layer(torch.randn(32, 64)).backward(grad)
    assert layer.fp8_overflow_counts.tolist() == [1, 0, 1]


def test_delayed_history_updates_and_scales_from_the_past():
    config = _config("delayed", amax_history_len=3)
    layer = Float8Linear.from_float(nn.Linear(64, 32, bias=False), config)
    x = torch.randn(32, 64)
    for step, factor in enumerate((1.0, 2.0, 4.0)):
        xi = (x * factor).requires_grad_()
        layer(xi).backward(torch.ones(32, 32) * factor)
        hist = layer.fp8_amax_history
        assert hist[0, 0].item() == pytest.approx(x.abs().max().item() * factor)
        assert hist[0, : step + 1].tolist() == pytest.approx(sorted(hist[0, : step + 1].tolist(), reverse=True))
        assert hist[2, 0].item() == pytest.approx(factor)  # grad_output amax recorded in backward
        assert hist[1, 0].item() == pytest.approx(layer.weight.abs().max().item())
    assert set(layer.state_dict()) == {"weight", "fp8_amax_history"}
    # the scale comes from the history's max: a 10x jump saturates (delayed scaling's known trade-off)
    out = layer(x * 40.0)
    ref = nn.functional.linear(x * 40.0, layer.weight)
    assert (out.abs().max() < ref.abs().max() * 0.5) and torch.isfinite(out).all()


def test_planted_wrong_scale_direction_is_caught(monkeypatch):
    # a quantiser that multiplies by amax / fp8_max instead of fp8_max / amax must fail the floor
    ok = reference_and_fp8(Float8TrainingConfig(), M, K, N)["out"]
    monkeypatch.setattr(scaling, "amax_to_scale",
                        lambda amax, dtype, power_of_2=False: (amax.double().clamp(min=scaling.EPS)
                                                               / torch.finfo(dtype).max).float())
    broken = reference_and_fp8(Float8TrainingConfig(), M, K, N)["out"]
    assert ok >= FLOORS["tensorwise"]["out"] > broken


@pytest.mark.parametrize("name", ["tensorwise", "delayed", "rowwise"])
def test_compiles_without_graph_breaks(name):
    torch._dynamo.reset()
    config = _config(name)
    torch.manual_seed(0)
    eager = Float8Linear.from_float(nn.Linear(64, 32), config)
    compiled = Float8Linear.from_float(nn.Linear(64, 32), config)
    compiled.load_state_dict(eager.state_dict())
    fn = torch.compile(compiled, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    x = torch.randn(2, 16, 64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager(xa).square().sum().backward()
    fn(xb).square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(compiled.weight.grad, eager.weight.grad)
    if eager.fp8_amax_history is not None:
        torch.testing.assert_close(compiled.fp8_amax_history, eager.fp8_amax_history)


def _grads(name: str, x_grad: bool, w_grad: bool, grad_mode: bool = True):
    """One fwd(+bwd) of a CPU Float8Linear on fixed data: (out, x.grad, weight.grad, bias.grad)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = Float8Linear.from_float(nn.Linear(K, N), _config(name))
    layer.weight.requires_grad_(w_grad)
    x = torch.randn(M, K, generator=gen).bfloat16().requires_grad_(x_grad)
    with torch.set_grad_enabled(grad_mode):
        out = layer(x)
    if out.requires_grad:
        out.backward(torch.randn(M, N, generator=gen).bfloat16())
    return out, x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("name", NATIVE_CPU)
def test_only_needed_gradients_are_computed_and_unchanged(name):
    full = _grads(name, True, True)
    frozen_w, no_x_grad, inference = _grads(name, True, False), _grads(name, False, True), _grads(name, True, True, False)
    assert frozen_w[2] is None and no_x_grad[1] is None and inference[1:] == (None, None, None)
    for got in (frozen_w, no_x_grad, inference):
        assert torch.equal(got[0], full[0])
    assert torch.equal(frozen_w[1], full[1]) and torch.equal(no_x_grad[2], full[2])
    assert torch.equal(frozen_w[3], full[3]) and torch.equal(no_x_grad[3], full[3])
