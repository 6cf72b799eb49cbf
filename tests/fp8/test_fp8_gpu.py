"""FP8 on a CUDA GPU: the real _scaled_mm path per recipe, blockwise support, inductor compile."""

import pytest
import torch
from torch import nn

from attnkit.fp8 import Float8Linear, Float8TrainingConfig, native_blockwise_support, sqnr
from fp8_helpers import reference_and_fp8
from test_fp8_linear import FLOORS, K, M, N

pytestmark = pytest.mark.gpu


def _fp8_gpu():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.parametrize("name", list(FLOORS))
def test_gpu_sqnr_floors(name):
    if not _fp8_gpu():
        pytest.skip("gpu: FP8 tensor cores need compute capability 8.9+")
    if name == "blockwise" and native_blockwise_support("cuda") is not None:
        pytest.skip(f"blockwise not native here: {native_blockwise_support('cuda')}")
    got = reference_and_fp8(Float8TrainingConfig.from_recipe_name(name), M, K, N, device="cuda")
    for key, floor in FLOORS[name].items():
        assert got[key] >= floor, (key, got)


@pytest.mark.parametrize("name", ["tensorwise", "rowwise", "delayed", "blockwise"])
def test_gpu_matches_emulation_and_compiles(name):
    if not _fp8_gpu():
        pytest.skip("gpu: FP8 tensor cores need compute capability 8.9+")
    if name == "blockwise" and native_blockwise_support("cuda") is not None:
        pytest.skip(f"blockwise not native here: {native_blockwise_support('cuda')}")
    torch._dynamo.reset()
    x = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16)
    results = []
    for mode in ("eager", "emulate", "inductor"):
        torch.manual_seed(0)
        config = Float8TrainingConfig.from_recipe_name(name, emulate=mode == "emulate", fast_accum_forward=False)
        layer = Float8Linear.from_float(nn.Linear(512, 384, device="cuda"), config)
        fn = torch.compile(layer, fullgraph=True) if mode == "inductor" else layer
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.float().square().sum().backward()
        results.append((out, xi.grad, layer.weight.grad))
    eager, emulated, compiled = results
    for what, a, b, c in zip(("out", "dx", "dw"), eager, emulated, compiled):
        # same quantisation; fp32 accumulation order differs
        assert sqnr(b, a) >= 35 and sqnr(a, c) >= 35, f"{what}: emulated vs eager {sqnr(b, a):.1f} dB, eager vs inductor {sqnr(a, c):.1f} dB"
