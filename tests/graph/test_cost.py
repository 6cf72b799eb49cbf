"""Roofline cost model and hardware profiles."""

import json

import pytest
import torch

from attnkit.errors import InvalidArgumentError
from attnkit.graph.cost import estimate, kernel_cost
from attnkit.graph.hardware import HardwareProfile, list_hardware, load_hardware, parse_dtype
from attnkit.graph.partition import Kernel, Partition, PartitionConfig

H100 = load_hardware("h100")


def _kernel(flops, nbytes):
    return Kernel("k", "gemm", ("n",), flops, nbytes, 0, "(top)")


@pytest.mark.parametrize("name", list_hardware())
def test_builtin_profiles_are_complete_and_consistent(name):
    profile = load_hardware(name)
    assert {"fp32", "bf16"} <= set(profile.achievable_tflops)
    for key, rate in profile.achievable_tflops.items():
        assert 0 < rate <= profile.peak_tflops[key], f"{name} {key}: achievable above peak"
    assert set(profile.attention_tflops) <= set(profile.achievable_tflops)
    assert all(profile.attention_tflops[k] <= profile.achievable_tflops[k] for k in profile.attention_tflops)
    assert 0 < profile.achievable_bandwidth_gbs <= profile.peak_bandwidth_gbs
    assert profile.launch_overhead_us > 0 and profile.eager_op_overhead_us > 0


def test_aliases_and_ridge_point():
    assert load_hardware("H100").key == "h100-sxm" and load_hardware("a100").key == "a100-80gb"
    assert H100.ridge_point(torch.bfloat16) == pytest.approx(660e12 / 2900e9)
    assert H100.ridge_point(torch.float32) < H100.ridge_point(torch.bfloat16)


def test_unknown_hardware_names_the_choices_and_calibrate():
    with pytest.raises(InvalidArgumentError, match="hardware.*h100-sxm.*calibrate"):
        load_hardware("tpu-v9")


def test_profile_json_round_trip(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({**H100.to_json(), "key": "calibrated", "source": "test"}))
    loaded = load_hardware(str(path))
    assert loaded.key == "calibrated" and loaded.achievable_tflops == H100.achievable_tflops


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    with pytest.raises(InvalidArgumentError, match="dtype"):
        parse_dtype("int8")


def test_kernel_time_is_the_larger_roof_plus_launch():
    big = kernel_cost(_kernel(flops=660e9, nbytes=2.9e6), H100, torch.bfloat16)  # 1 ms compute, 1 us memory
    assert big.bound == "compute" and big.time_s == pytest.approx(1e-3 + 2.5e-6)
    copy = kernel_cost(_kernel(flops=0, nbytes=2.9e9), H100, torch.bfloat16)
    assert copy.bound == "memory" and copy.time_s == pytest.approx(1e-3 + 2.5e-6)
    assert _kernel(660e9, 2.9e6).bound(H100.ridge_point(torch.bfloat16)) == big.bound
    flash = kernel_cost(Kernel("sdpa", "attention", ("n",), 330e9, 1, 0, "(top)"), H100, torch.bfloat16)
    assert flash.compute_s == pytest.approx(1e-3), "attention runs at the fused-attention rate"


def test_forward_is_limited_by_the_slower_of_device_and_host():
    tiny = tuple(_kernel(1000, 1000) for _ in range(100))
    eager = estimate(Partition(PartitionConfig.from_mode("eager"), tiny, host_ops=300), H100, torch.bfloat16)
    assert eager.limiter == "host" and eager.predicted_s == pytest.approx(300 * 15e-6)
    heavy = tuple(_kernel(660e9, 1) for _ in range(3))
    compiled = estimate(Partition(PartitionConfig.from_mode("compiled"), heavy, host_ops=3), H100, torch.bfloat16)
    assert compiled.limiter == "device" and compiled.predicted_s == pytest.approx(3 * (1e-3 + 2.5e-6))
    assert compiled.num_kernels == 3 and "predicted_ms" in repr(compiled)


def test_profile_validation():
    with pytest.raises(InvalidArgumentError, match="kind"):
        HardwareProfile.from_json({**H100.to_json(), "kind": "tpu"})
