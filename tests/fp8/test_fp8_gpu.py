"""FP8 on a CUDA GPU: the real _scaled_mm path per recipe, blockwise support, inductor compile."""

import pytest
import torch

from attnkit.fp8 import Float8TrainingConfig, native_blockwise_support, sqnr
from fp8_helpers import EMULATED_FLOOR_DB, fwd_bwd_per_mode, reference_and_fp8
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


COMPILED_FLOOR_DB = 35  # inductor's fused casts may round a few FP8 codes differently from eager's


@pytest.mark.parametrize("name", ["tensorwise", "rowwise", "delayed", "blockwise"])
def test_gpu_matches_emulation_and_compiles(name):
    if not _fp8_gpu():
        pytest.skip("gpu: FP8 tensor cores need compute capability 8.9+")
    if name == "blockwise" and native_blockwise_support("cuda") is not None:
        pytest.skip(f"blockwise not native here: {native_blockwise_support('cuda')}")
    torch._dynamo.reset()
    got = fwd_bwd_per_mode(name, ("eager", "emulate", "inductor"), device="cuda")
    for i, what in enumerate(("out", "dx", "dw")):
        eager, emulated, compiled = (got[mode][i] for mode in ("eager", "emulate", "inductor"))
        db = sqnr(emulated, eager), sqnr(eager, compiled)
        assert db[0] >= EMULATED_FLOOR_DB and db[1] >= COMPILED_FLOOR_DB, (
            f"{what}: emulated vs eager {db[0]:.1f} dB, eager vs inductor {db[1]:.1f} dB")
