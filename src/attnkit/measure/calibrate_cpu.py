"""Measure a hardware profile on this machine's CPU, with its thread count: every number the cost model uses.

Quick by design (10-30 s on 2 cores): the shapes are the ones BERT-base (128 tokens) and ViT-B/16
(197 tokens) run at batch 1, in fp32 (the CPU's analysis dtype), so the rates are the rates those
models see (cache-resident activations, not a DRAM stream):

* GEMM rate vs size: ``linear`` with bias at M = 16, 128, 197, 1024 and K x N = 768x768, 768x2304,
  768x3072, 3072x768, cycling through 4 weights (cold in cache, as a model's layers are).
* SDPA rate vs sequence at B*H = 12, D = 64, S = 64 ... 512.
* Convolution rate: a ViT patch embedding (1x3x224x224, 768 filters 16x16 stride 16).
* Bandwidth of memory-bound kernels per kind (bytes read + written, dispatch cost subtracted):
  add, GELU, layer norm, softmax, a row sum, a transposing copy, an embedding gather.
* Host: one ATen op on a one-element tensor (dispatch, ``host_launch_*_us``: the CPU that launches
  also computes, so idle = busy), one view op, one ``nn.Module`` call.

On a CPU the same cores dispatch and compute, so the cost model adds host time to the kernel times
(:mod:`attnkit.analyze.cost`) and ``launch_overhead_us`` is 0 (the dispatch is in the host term).
Peaks are not measured: they are the best rates seen.
"""

from __future__ import annotations

import datetime
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from attnkit.bench import cpu_ms
from attnkit.hardware.profiles import HardwareProfile

__all__ = ["calibrate_cpu", "cpu_name"]

_GEMM_M = (16, 128, 197, 1024)
_GEMM_KN = ((768, 768), (768, 2304), (768, 3072), (3072, 768))
_ATTENTION_SEQ = (64, 128, 197, 512)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else ``platform.processor()``), e.g. ``"AMD EPYC 7B13"``."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"



def _gemm_curve(weights: int = 4) -> list[list[float]]:
    """``[[GFLOP, TFLOP/s], ...]`` ascending (same size measured twice: the faster shape is kept).

    Each timing runs ``weights`` GEMMs with different weights, as consecutive layers do: one weight
    reused call after call would stay in cache and overstate the rate.
    """
    rates: dict[float, float] = {}
    for m, (k, n) in [(m, kn) for m in _GEMM_M for kn in _GEMM_KN]:
        x, b = torch.randn(m, k, device="cpu"), torch.randn(n, device="cpu")
        ws = [torch.randn(n, k, device="cpu") for _ in range(weights)]
        flops = 2 * m * k * n
        gflop = round(flops / 1e9, 5)
        seconds = cpu_ms(lambda: [F.linear(x, w, b) for w in ws]) * 1e-3 / weights
        rates[gflop] = max(rates.get(gflop, 0.0), flops / seconds / 1e12)
    return [[g, round(r, 4)] for g, r in sorted(rates.items())]


def _attention_curve(heads: int = 12, dim: int = 64) -> list[list[float]]:
    points = []
    for seq in _ATTENTION_SEQ:
        q, k, v = (torch.randn(1, heads, seq, dim, device="cpu") for _ in range(3))
        seconds = cpu_ms(lambda: F.scaled_dot_product_attention(q, k, v)) * 1e-3
        points.append([seq, round(4 * heads * seq * seq * dim / seconds / 1e12, 4)])
    return points


def _conv_tflops() -> float:
    x, w, b = (torch.randn(*shape, device="cpu") for shape in ((1, 3, 224, 224), (768, 3, 16, 16), (768,)))
    flops = 2 * 196 * 768 * 3 * 16 * 16
    return round(flops / (cpu_ms(lambda: F.conv2d(x, w, b, stride=16)) * 1e-3) / 1e12, 4)


def _bandwidths(dispatch_us: float) -> dict[str, float]:
    """GB/s per memory-bound kind, bytes read + written, at BERT/ViT batch-1 sizes in fp32."""
    cpu = {"device": "cpu"}
    x, y, wide = torch.randn(197, 768, **cpu), torch.randn(197, 768, **cpu), torch.randn(197, 3072, **cpu)
    scores = torch.randn(1, 12, 197, 197, **cpu)
    gamma, beta = torch.ones(768, **cpu), torch.zeros(768, **cpu)
    table, ids = torch.randn(30522, 768, **cpu), torch.randint(0, 30522, (1, 128), **cpu)
    size = x.numel() * 4
    cases = {
        "pointwise": (lambda: x + y, 3 * size),
        "activation": (lambda: F.gelu(wide), 2 * wide.numel() * 4),
        "norm": (lambda: F.layer_norm(x, (768,), gamma, beta), 2 * size),
        "softmax": (lambda: scores.softmax(-1), 2 * scores.numel() * 4),
        "reduction": (lambda: wide.sum(-1), wide.numel() * 4),
        "copy": (lambda: x.view(1, 197, 12, 64).transpose(1, 2).contiguous(), 2 * size),
        "gather": (lambda: F.embedding(ids, table), 2 * ids.numel() * 768 * 4),
    }
    return {kind: round(nbytes / max(cpu_ms(fn) * 1e-3 - dispatch_us * 1e-6, 1e-7) / 1e9, 1)
            for kind, (fn, nbytes) in cases.items()}


def _host_us() -> dict[str, float]:
    """Microseconds of one tiny ATen op, one view op and one module call (each over 200 calls)."""
    x = torch.zeros(1, device="cpu")
    count = 200

    def ops():
        for _ in range(count):
            x.add(1)

    def views():
        for _ in range(count):
            x.view(1, 1)

    identities = torch.nn.Sequential(*[torch.nn.Identity() for _ in range(count)])
    with torch.no_grad():
        return {"op": cpu_ms(ops) * 1e3 / count, "view": cpu_ms(views) * 1e3 / count,
                "module": cpu_ms(lambda: identities(x)) * 1e3 / count}


def calibrate_cpu(log: Callable[[str], None] = print) -> HardwareProfile:
    """Measure this CPU at ``torch.get_num_threads()`` threads and return a :class:`HardwareProfile` (kind ``"cpu"``)."""
    threads = torch.get_num_threads()
    name = f"{cpu_name()} ({threads} threads)"
    with torch.no_grad():
        log("host dispatch, views, module calls")
        host = _host_us()
        log("GEMM rate vs size (fp32)")
        curve = _gemm_curve()
        log("SDPA rate vs sequence, patch convolution")
        attention = _attention_curve()
        conv = _conv_tflops()
        log("bandwidth per kernel kind")
        bandwidth = _bandwidths(host["op"])
    best_gemm = max(rate for _, rate in curve)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return HardwareProfile(
        key="calibrated", name=name, kind="cpu",
        peak_tflops={"fp32": best_gemm}, achievable_tflops={"fp32": best_gemm},
        attention_tflops={"fp32": attention[-1][1]},
        peak_bandwidth_gbs=max(bandwidth.values()), achievable_bandwidth_gbs=bandwidth["copy"],
        launch_overhead_us=0.0,
        host_launch_idle_us=round(host["op"], 2), host_launch_busy_us=round(host["op"], 2),
        host_view_us=round(host["view"], 2), host_module_us=round(host["module"], 2),
        compiled_launch_overhead_us=round(host["op"], 2),
        gemm_tflops_by_size={"fp32": curve}, attention_tflops_by_seq={"fp32": attention},
        conv_tflops={"fp32": conv}, bandwidth_gbs_by_kind=bandwidth,
        source=f"calibrated on {name}, torch {torch.__version__}, {date}",
        extra={"device": name, "cpu": cpu_name(), "threads": threads, "torch": torch.__version__, "date": date,
               "command": " ".join(sys.argv), "platform": platform.platform()},
    )
