"""The fused Triton FP8 casts: the same bytes and scales as the torch path, and Float8Linear's eager dispatch.

Layout-only equality, so exact: every FP8 byte and every float32 scale must match ``scaling.quantize``.
(Under ``TRITON_INTERPRET=1`` the kernels run on CPU, but the interpreter's float32 -> FP8 conversion
truncates instead of rounding to nearest even, so the byte comparison needs a real GPU.)
"""

import pytest
import torch
from torch import nn

from attnkit.fp8 import Float8Linear, Float8TrainingConfig, Granularity, quantize
from attnkit.fp8 import linear as linear_mod

pytestmark = pytest.mark.gpu

triton_cast = pytest.importorskip("attnkit.fp8.triton_cast", reason="gpu: the fused casts need triton")

FORMATS = (torch.float8_e4m3fn, torch.float8_e5m2)


@pytest.fixture(autouse=True)
def _fp8_gpu():
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        pytest.skip("gpu: Triton FP8 casts need compute capability 8.9+")


def _operand(shape: tuple[int, int], seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``dtype`` (shape) with an all-zero row, a 1e4x outlier and a value in the FP8 subnormal range."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 3
    x[3] = 0
    x[5, 7] = 3e4
    x[7, 1] = 1e-6
    return x.to("cuda", dtype)


def _assert_same(got, want):
    assert got.data.shape == want.data.shape and got.data.is_contiguous()
    assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8)), (
        f"{int((got.data.view(torch.uint8) != want.data.view(torch.uint8)).sum())} FP8 bytes differ")
    assert got.scale.shape == want.scale.shape
    assert torch.equal(got.scale, want.scale), (got.scale - want.scale).abs().max()


@pytest.mark.parametrize("shape", [(1000, 1232), (4096, 4096), (48, 8208)])
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "t-view"])
@pytest.mark.parametrize("granularity", [Granularity.TENSOR, Granularity.ROW], ids=["tensor", "row"])
@pytest.mark.parametrize("dtype", FORMATS, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("power_of_2", [False, True], ids=["exact", "pow2"])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_bytes_and_scales_match_torch(shape, transposed, granularity, dtype, power_of_2, x_dtype):
    """Both input widths: 16-bit operands store their transpose from the kernel, float32 ones copy it."""
    x = _operand(shape, dtype=x_dtype)
    x = x.t() if transposed else x  # a strided (outer, inner) view, as backward passes
    got, got_t = triton_cast.quantize(x, dtype, granularity, power_of_2=power_of_2,
                                      with_t=granularity is Granularity.TENSOR)
    want = quantize(x, dtype, granularity, power_of_2=power_of_2)
    _assert_same(got, want)
    if got_t is not None:
        _assert_same(got_t, want.t_tensorwise())


@pytest.mark.parametrize("amax", [0.0, 0.37, 3e4])
def test_given_amax_matches_torch(amax):
    x = _operand((512, 768))
    amax = torch.tensor(amax, device="cuda")  # delayed scaling: the history's amax, not x's
    got, _ = triton_cast.quantize(x, torch.float8_e4m3fn, Granularity.TENSOR, amax=amax)
    _assert_same(got, quantize(x, torch.float8_e4m3fn, Granularity.TENSOR, amax=amax))


@pytest.mark.parametrize("granularity", [Granularity.TENSOR, Granularity.ROW], ids=["tensor", "row"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_gives_nan_scale_like_torch(granularity, bad):
    x = _operand((256, 512))
    x[9, 11] = bad
    got, _ = triton_cast.quantize(x, torch.float8_e4m3fn, granularity)
    want = quantize(x, torch.float8_e4m3fn, granularity)
    assert torch.equal(got.scale.isnan(), want.scale.isnan()) and bool(got.scale.isnan().any())
    assert torch.equal(got.scale.nan_to_num(), want.scale.nan_to_num())
    if granularity is Granularity.ROW:  # the finite rows are untouched by the bad one
        ok = ~want.scale.isnan().flatten()
        assert torch.equal(got.data[ok].view(torch.uint8), want.data[ok].view(torch.uint8))


def _step(name: str, monkeypatch, fused: bool):
    """One eager fwd+bwd of a CUDA Float8Linear (recipe ``name``) with or without the Triton casts."""
    calls = []
    real = triton_cast.quantize

    def spy(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)
    monkeypatch.setattr(triton_cast, "quantize", spy)
    if not fused:
        monkeypatch.setattr(linear_mod, "_fused_casts", lambda t, granularity: None)
    torch.manual_seed(0)
    config = Float8TrainingConfig.from_recipe_name(name, fast_accum_forward=False)
    layer = Float8Linear.from_float(nn.Linear(1024, 768, device="cuda"), config)
    x = _operand((4 * 256, 1024)).view(4, 256, 1024).requires_grad_()
    grad = _operand((4 * 256, 768), seed=1).view(4, 256, 768)
    out = layer(x)
    out.backward(grad)
    monkeypatch.undo()
    return (out, x.grad, layer.weight.grad, layer.bias.grad, layer.fp8_overflow_counts), calls


@pytest.mark.parametrize("name", ["tensorwise", "delayed", "rowwise", "rowwise_with_gw_hp"])
def test_linear_eager_dispatch_is_bit_identical(name, monkeypatch):
    fused, calls = _step(name, monkeypatch, fused=True)
    plain, plain_calls = _step(name, monkeypatch, fused=False)
    assert len(calls) >= 3 and not plain_calls  # x, W, grad_out at least went through Triton
    for what, a, b in zip(("out", "grad_x", "grad_w", "grad_b", "overflow counts"), fused, plain):
        assert torch.equal(a, b), what
