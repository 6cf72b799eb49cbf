"""Measure a hardware profile on the current CUDA GPU: matmul rates, copy bandwidth, launch overheads.

Measured: achievable matmul TFLOP/s per dtype (square GEMMs), fused SDPA TFLOP/s, copy bandwidth
(device-to-device copy of 1 GiB, read + write), device-side time per tiny kernel (CUDA-graph
replay of 1000 launches) and host time per eager op called through ``nn.Module``. Datasheet
peaks and the compiled launch overhead are taken from the built-in profile of the same GPU
family (or the H100 one); ``extra`` records which numbers were measured.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable

import torch

from attnkit.bench import time_fn
from attnkit.errors import UnsupportedError
from attnkit.graph.hardware import HardwareProfile, list_hardware, load_hardware

__all__ = ["calibrate"]

_GEMMS = {"bf16": (torch.bfloat16, 8192, False), "fp16": (torch.float16, 8192, False),
          "tf32": (torch.float32, 8192, True), "fp32": (torch.float32, 4096, False)}


def _matmul_tflops(dtype: torch.dtype, size: int, tf32: bool) -> float:
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        timing = time_fn(lambda: a @ b, warmup=3, repeats=10, device="cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * size**3 / (timing.median_ms * 1e-3) / 1e12


def _copy_gbs(gib: float = 1.0) -> float:
    source = torch.empty(int(gib * 2**30) // 4, device="cuda", dtype=torch.float32)
    target = torch.empty_like(source)
    timing = time_fn(lambda: target.copy_(source), warmup=3, repeats=10, device="cuda")
    return 2 * source.numel() * 4 / (timing.median_ms * 1e-3) / 1e9


def _device_launch_us(count: int = 1000) -> float:
    """Device time per tiny kernel, launched from a CUDA graph so host overhead is excluded."""
    x = torch.zeros(1, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x.add_(1)  # warm the kernel up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(count):
            x.add_(1)
    timing = time_fn(graph.replay, warmup=2, repeats=10, device="cuda")
    return timing.median_ms * 1e3 / count


def _attention_tflops(dtype: torch.dtype) -> float:
    """Fused SDPA forward rate at B=8, H=16, S=2048, D=64 (non-causal)."""
    q, k, v = (torch.randn(8, 16, 2048, 64, device="cuda", dtype=dtype) for _ in range(3))
    timing = time_fn(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), warmup=3, repeats=10, device="cuda")
    return 4 * 8 * 16 * 2048 * 2048 * 64 / (timing.median_ms * 1e-3) / 1e12


def _eager_op_us(layers: int = 100) -> float:
    """Host wall time per eager op called through nn.Module (one ATen op per module), no sync inside."""
    model = torch.nn.Sequential(*[m for _ in range(layers) for m in (torch.nn.Linear(8, 8), torch.nn.GELU(),
                                                                     torch.nn.LayerNorm(8))]).cuda()
    x = torch.zeros(1, 8, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(x)
        elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed * 1e6 / (3 * layers)


def _family(device_name: str) -> HardwareProfile:
    name = device_name.lower()
    for key in list_hardware():
        if key.split("-")[0] in name:
            return load_hardware(key)
    return load_hardware("h100")


def calibrate(log: Callable[[str], None] = print) -> HardwareProfile:
    """Measure the current GPU and return a :class:`HardwareProfile` (save it with ``to_json``)."""
    if not torch.cuda.is_available():
        raise UnsupportedError("calibrate needs a CUDA GPU (torch.cuda.is_available() is False); "
                               "on CPU pass --hardware cpu to analyze.")
    device = torch.cuda.get_device_name()
    base = _family(device)
    rates = {}
    for key, (dtype, size, tf32) in _GEMMS.items():
        log(f"matmul {key} {size}x{size}")
        rates[key] = round(_matmul_tflops(dtype, size, tf32), 1)
    attention = {}
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        log(f"attention {key}")
        attention[key] = round(_attention_tflops(dtype), 1)
    log("copy bandwidth")
    bandwidth = round(_copy_gbs(), 1)
    log("launch overheads")
    launch, eager = round(_device_launch_us(), 2), round(_eager_op_us(), 2)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return HardwareProfile(
        key="calibrated", name=device, kind="gpu",
        peak_tflops=dict(base.peak_tflops), achievable_tflops={**base.achievable_tflops, **rates},
        attention_tflops={**base.attention_tflops, **attention},
        peak_bandwidth_gbs=base.peak_bandwidth_gbs, achievable_bandwidth_gbs=bandwidth,
        launch_overhead_us=launch, eager_op_overhead_us=eager,
        compiled_launch_overhead_us=base.compiled_launch_overhead_us,
        memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1),
        source=f"calibrated on {device}, torch {torch.__version__}, {date}",
        extra={"measured": [*sorted(rates), "attention_tflops", "achievable_bandwidth_gbs", "launch_overhead_us",
                            "eager_op_overhead_us"], "peaks_from": base.key},
    )
