"""Roofline cost model and hardware profiles."""

import json

import pytest
import torch

from attnkit.errors import InvalidArgumentError
from attnkit.analyze.cost import estimate, kernel_cost, overlap
from attnkit.measure import load_hardware
from attnkit.hardware.profiles import DEFAULT_MISALIGNED_FACTOR, HardwareProfile, list_hardware
from attnkit.utils import parse_dtype
from attnkit.analyze.partition import Kernel, Partition, PartitionConfig

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
    assert profile.launch_overhead_us > 0 and profile.host_view_us > 0 and profile.host_module_us > 0
    assert profile.host_launch_idle_us >= profile.host_launch_busy_us > 0
    for curves in (profile.gemm_tflops_by_size, profile.attention_tflops_by_seq):
        for key, points in curves.items():
            assert [x for x, _ in points] == sorted(x for x, _ in points), f"{name} {key}: curve not ascending"
            assert all(0 < rate <= profile.peak_tflops[key] for _, rate in points)


def test_aliases_and_ridge_point():
    assert load_hardware("H100").key == "h100-sxm" and load_hardware("a100").key == "a100-80gb"
    assert H100.ridge_point(torch.bfloat16) == pytest.approx(H100.matmul_rate(torch.bfloat16) / H100.bandwidth)
    assert H100.ridge_point(torch.float32) < H100.ridge_point(torch.bfloat16)


def test_unknown_hardware_names_the_choices_and_calibrate():
    with pytest.raises(InvalidArgumentError, match="hardware.*h100-sxm.*calibrate"):
        load_hardware("tpu-v9")


def test_profile_json_round_trip(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({**H100.to_json(), "key": "calibrated", "source": "test"}))
    loaded = load_hardware(str(path))
    assert loaded.key == "calibrated" and loaded.achievable_tflops == H100.achievable_tflops
    assert loaded.gemm_tflops_by_size == H100.gemm_tflops_by_size


def test_old_calibrate_files_still_load(tmp_path):
    """A profile written before the host/device split (eager_op_overhead_us, no curves) takes the missing
    fields from the built-in profile of its GPU family and keeps what it measured."""
    old = {k: v for k, v in H100.to_json().items() if not k.startswith(("host_", "gemm_", "attention_tflops_by"))}
    path = tmp_path / "old.json"
    path.write_text(json.dumps({**old, "key": "calibrated", "name": "NVIDIA H100 80GB HBM3",
                                "achievable_tflops": {"bf16": 790.8}, "eager_op_overhead_us": 23.7}))
    loaded = load_hardware(str(path))
    assert loaded.key == "calibrated" and loaded.achievable_tflops == {"bf16": 790.8}
    assert loaded.host_launch_idle_us == H100.host_launch_idle_us
    assert loaded.gemm_tflops_by_size == H100.gemm_tflops_by_size


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    with pytest.raises(InvalidArgumentError, match="dtype"):
        parse_dtype("int8")


# A planted profile: round numbers so every expected time is exact arithmetic.
PLANTED = HardwareProfile.from_json({
    **H100.to_json(), "key": "planted", "achievable_tflops": {"bf16": 1000.0, "fp32": 100.0},
    "gemm_tflops_by_size": {"bf16": [[1.0, 100.0], [100.0, 1000.0]]},
    "attention_tflops_by_seq": {"bf16": [[100, 50.0], [1000, 500.0]]}, "attention_tflops": {"bf16": 600.0},
    "conv_tflops": {"bf16": 20.0}, "achievable_bandwidth_gbs": 2000.0,
    "bandwidth_gbs_by_kind": {"pointwise": 3000.0, "norm": 1000.0, "activation": 1500.0},
    "launch_overhead_us": 2.0, "host_launch_idle_us": 30.0, "host_launch_busy_us": 10.0, "host_view_us": 4.0,
    "host_module_us": 5.0, "compiled_launch_overhead_us": 20.0,
})


def test_kernel_time_is_the_larger_roof_plus_launch():
    big = kernel_cost(_kernel(flops=1e12, nbytes=2e6), PLANTED, torch.bfloat16)  # 1 ms compute, 1 us memory
    assert big.bound == "compute" and big.time_s == pytest.approx(1e-3 + 2e-6)
    copy = kernel_cost(Kernel("clone", "copy", ("n",), 0, int(2e9), 0, "(top)"), PLANTED, torch.bfloat16)
    assert copy.bound == "memory" and copy.time_s == pytest.approx(1e-3 + 2e-6), "copy kind: achievable bandwidth"


@pytest.mark.parametrize("gflop, tflops", [(0.5, 100.0), (1.0, 100.0), (10.0, 550.0), (100.0, 1000.0), (1e4, 1000.0)])
def test_gemm_rate_follows_the_size_curve_in_log_space(gflop, tflops):
    assert PLANTED.gemm_rate(torch.bfloat16, gflop * 1e9) == pytest.approx(tflops * 1e12)
    assert PLANTED.gemm_rate(torch.float32, gflop * 1e9) == pytest.approx(100e12), "no curve: the large-GEMM rate"


def test_attention_rate_depends_on_sequence_length():
    short = Kernel("sdpa", "attention", ("n",), int(50e9), 1, 0, "(top)", seq_kv=100)
    long = Kernel("sdpa", "attention", ("n",), int(500e9), 1, 0, "(top)", seq_kv=1000)
    assert kernel_cost(short, PLANTED, torch.bfloat16).compute_s == pytest.approx(1e-3)
    assert kernel_cost(long, PLANTED, torch.bfloat16).compute_s == pytest.approx(1e-3)
    assert PLANTED.attention_rate(torch.bfloat16) == pytest.approx(600e12), "no length: the long-sequence rate"


@pytest.mark.parametrize("name, category, gbs", [
    ("add", "pointwise", 3000.0), ("gelu", "pointwise", 1500.0), ("add+layer_norm", "reduction", 1000.0),
    ("sum", "reduction", 2000.0),  # reduction not listed: the copy bandwidth
])
def test_memory_bound_kernels_use_the_bandwidth_of_their_kind(name, category, gbs):
    kernel = Kernel(name, category, ("n",), 0, int(gbs * 1e6), 0, "(top)")  # 1 ms at the kind's bandwidth
    assert kernel_cost(kernel, PLANTED, torch.bfloat16).memory_s == pytest.approx(1e-3)


def _partition(mode, kernels, host_ops=0, module_calls=0):
    return Partition(PartitionConfig.from_mode(mode), kernels, host_ops, module_calls)


def test_host_dominates_when_kernels_are_tiny():
    tiny = tuple(_kernel(1000, 1000) for _ in range(100))
    cost = estimate(_partition("eager", tiny, host_ops=300, module_calls=50), PLANTED, torch.bfloat16)
    idle = (100 * 30 + 200 * 4 + 50 * 5) * 1e-6  # launches, views, module calls
    busy = (100 * 10 + 200 * 4 + 50 * 5) * 1e-6
    assert cost.host_s == pytest.approx(idle) and cost.host_busy_s == pytest.approx(busy)
    assert cost.limiter == "host"
    empty = 1 - cost.device_s / busy
    assert cost.predicted_s == pytest.approx(busy + empty * (idle - busy))
    assert cost.device_s < cost.predicted_s < idle, "a little device work keeps part of the queue busy"


def test_device_dominates_when_kernels_are_heavy():
    heavy = tuple(_kernel(int(100e9), 1) for _ in range(3))  # 100 GFLOP at 1000 TFLOP/s: 0.1 ms each
    cost = estimate(_partition("eager", heavy, host_ops=3, module_calls=1), PLANTED, torch.bfloat16)
    assert cost.limiter == "device" and cost.predicted_s == pytest.approx(3 * (100e-6 + 2e-6))
    assert cost.num_kernels == 3 and "predicted_ms" in repr(cost)


def test_compiled_host_cost_is_per_launch():
    kernels = tuple(_kernel(1000, 1000) for _ in range(10))
    cost = estimate(_partition("compiled", kernels, host_ops=10), PLANTED, torch.bfloat16)
    assert cost.host_s == cost.host_busy_s == pytest.approx(10 * 20e-6)
    assert cost.predicted_s == pytest.approx(10 * 20e-6)


@pytest.mark.parametrize("device, host", [(0.0, 5.0), (1.0, 4.75), (4.0, 4.0), (6.0, 6.0)])
def test_overlap_is_continuous_between_host_and_device_bound(device, host):
    assert overlap(device, 5.0, 4.0) == pytest.approx(host)  # host idle 5, busy 4



def test_profile_validation():
    with pytest.raises(InvalidArgumentError, match="kind"):
        HardwareProfile.from_json({**H100.to_json(), "kind": "tpu"})
    with pytest.raises(InvalidArgumentError, match="gemm_tflops_by_size.*ascending"):
        HardwareProfile.from_json({**H100.to_json(), "gemm_tflops_by_size": {"bf16": [[10.0, 500.0], [1.0, 100.0]]}})


def _planted(**fields):
    """H100 with a planted two-point GEMM curve (1 and 100 GFLOP) and any field overridden."""
    return HardwareProfile.from_json({**H100.to_json(), "gemm_tflops_by_size": {"bf16": [[1.0, 400.0], [100.0, 800.0]]},
                                      **fields}, "planted")


def test_small_gemms_clamp_to_the_smallest_point_and_are_bound_by_their_weights():
    """Below the smallest calibrated GEMM the rate is held, not extrapolated down; a batch-1 GEMM
    (M = 128, 768 x 3072 bf16 weights, 4.7 MB) then costs its weight read at the copy bandwidth."""
    profile = _planted()
    assert profile.gemm_rate(torch.bfloat16, 0.01e9) == pytest.approx(400e12)
    flops, weights = 2 * 128 * 768 * 3072, 768 * 3072 * 2
    nbytes = weights + 128 * (768 + 3072) * 2
    cost = kernel_cost(Kernel("linear", "gemm", ("n",), flops, nbytes, weights, "(top)"), profile, torch.bfloat16)
    assert cost.bound == "memory" and cost.memory_s == pytest.approx(nbytes / profile.bandwidth)
    assert cost.time_s < 5e-6


@pytest.mark.parametrize("factor", [None, 0.25])
def test_misaligned_gemms_run_at_the_profile_fraction(factor):
    profile = _planted(**({"gemm_misaligned_factor": {"bf16": factor}} if factor else {}))
    expected = factor or DEFAULT_MISALIGNED_FACTOR
    flops = 2 * 8192 * 768 * 50257
    aligned = Kernel("linear", "gemm", ("n",), flops, 1, 0, "(top)")
    odd = Kernel("linear", "gemm", ("n",), flops, 1, 0, "(top)", misaligned=True)
    slow, fast = (kernel_cost(k, profile, torch.bfloat16).compute_s for k in (odd, aligned))
    assert slow == pytest.approx(fast / expected)


def test_compiled_gemms_are_padded_to_alignment():
    """Inductor pads a misaligned GEMM's dimensions (shape_padding), so only eager pays the factor."""
    odd = (Kernel("linear", "gemm", ("n",), int(100e9), 1, 0, "(top)", misaligned=True),)
    eager, compiled = (estimate(_partition(mode, odd), H100, torch.bfloat16).device_s for mode in ("eager", "compiled"))
    assert eager > 2 * compiled


def test_misaligned_factor_is_checked():
    with pytest.raises(InvalidArgumentError, match="gemm_misaligned_factor"):
        _planted(gemm_misaligned_factor={"bf16": 1.5})


@pytest.mark.parametrize(("n", "dtype", "misaligned"), [(50257, torch.bfloat16, True), (50264, torch.bfloat16, False),
                                                          (50260, torch.float32, False), (50260, torch.bfloat16, True)])
def test_partition_marks_gemms_with_unaligned_rows(n, dtype, misaligned):
    """Only row lengths matter: 197 tokens (odd M) is fine, N = 50257 (GPT-2's vocabulary) is not."""
    from attnkit.discover.capture import capture
    from attnkit.analyze.partition import partition

    model = torch.nn.Linear(64, n, bias=False)
    graph = capture(model, (torch.randn(197, 64),)).graph_module.graph
    gemms = [k for k in partition(graph, dtype, "eager").kernels if k.category == "gemm"]
    assert len(gemms) == 1 and gemms[0].misaligned is misaligned
