"""Measure a hardware profile on the current CUDA GPU: every number the cost model uses.

(:func:`calibrate` with ``device="cpu"`` measures this machine's CPU instead: :mod:`attnkit.measure.calibrate_cpu`.)

Device side (CUDA events, medians, every call queued behind a sleeping kernel so host dispatch is excluded):

* GEMM rate vs size: ``linear`` with bias at transformer shapes (M = 128, 197, 1024, 64*197; K x N =
  768x768, 768x2304, 768x3072, 3072x768) and 8192^3, per 16-bit dtype; fp32/tf32 at large size.
* Fused SDPA rate vs sequence length at B*H = 64*12, D = 64, S = 128 ... 1024, and at S = 2048.
* Misaligned GEMM: ``linear`` at M = 8192, K = 768, N = 50257 (rows not a multiple of 16 bytes) vs
  N = 50264, the rate ratio per 16-bit dtype (``gemm_misaligned_factor``).
* Convolution rate: a ViT patch embedding (64x3x224x224, 768 filters 16x16 stride 16).
* Bandwidth of memory-bound kernels per kind (bytes read + written, launch cost subtracted):
  add, GELU, layer norm, softmax, a row sum, a transposing copy, an embedding gather.
* Copy bandwidth (1 GiB device-to-device) and device cost per kernel (CUDA-graph replay of tiny kernels, no host in the loop).

Host side (``perf_counter`` around calls that do not synchronise):

* one ``nn.Module`` call, one view op, both measured in isolation;
* one kernel launch, fitted on a reference transformer block at tiny width (its launches,
  views and module calls counted by :func:`attnkit.analyze.partition.partition`), once with the
  GPU idle and once with its queue backlogged by a sleeping kernel;
* one launch of a ``torch.compile``'d forward: host time of the compiled block / its kernels.

Datasheet peaks come from the built-in profile of the same GPU family (or the H100 one).
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnkit.bench import count_kernels, device_ms, host_ms
from attnkit.errors import UnsupportedError, check_arg
from attnkit.hardware.profiles import HardwareProfile, family_profile
from attnkit.utils.dtypes import parse_dtype

__all__ = ["calibrate"]

_HALF = ("bf16", "fp16")
_GEMM_M = (128, 197, 1024, 64 * 197)
_GEMM_KN = ((768, 768), (768, 2304), (768, 3072), (3072, 768))
_ATTENTION_SEQ = (128, 197, 256, 512, 1024)



def _gemm_curve(dtype: torch.dtype) -> list[list[float]]:
    """``[[GFLOP, TFLOP/s], ...]`` ascending, for linear-with-bias at transformer shapes and 8192^3."""
    points = []
    for m, k, n in [(m, k, n) for m in _GEMM_M for k, n in _GEMM_KN] + [(8192, 8192, 8192)]:
        x, w, b = (torch.randn(*shape, device="cuda", dtype=dtype) for shape in ((m, k), (n, k), (n,)))
        flops = 2 * m * k * n
        points.append([round(flops / 1e9, 4), round(flops / (device_ms(lambda: F.linear(x, w, b)) * 1e-3) / 1e12, 1)])
    return sorted(points)


def _misaligned_factor(dtype: torch.dtype, m: int = 8192, k: int = 768) -> float:
    """Rate of ``linear`` at N = 50257 (GPT-2's vocabulary, rows not 16-byte aligned) over N = 50264."""
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    rates = []
    for n in (50257, 50264):
        w = torch.randn(n, k, device="cuda", dtype=dtype)
        rates.append(2 * m * k * n / device_ms(lambda: F.linear(x, w), repeats=7))
    return round(min(1.0, rates[0] / rates[1]), 3)


def _matmul_tflops(dtype: torch.dtype, size: int, tf32: bool) -> float:
    a, b = (torch.randn(size, size, device="cuda", dtype=dtype) for _ in range(2))
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        return 2 * size**3 / (device_ms(lambda: a @ b) * 1e-3) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _attention_tflops(dtype: torch.dtype, batch: int, heads: int, seq: int) -> float:
    q, k, v = (torch.randn(batch, heads, seq, 64, device="cuda", dtype=dtype) for _ in range(3))
    seconds = device_ms(lambda: F.scaled_dot_product_attention(q, k, v)) * 1e-3
    return round(4 * batch * heads * seq * seq * 64 / seconds / 1e12, 1)


def _conv_tflops(dtype: torch.dtype) -> float:
    x = torch.randn(64, 3, 224, 224, device="cuda", dtype=dtype)
    w, b = torch.randn(768, 3, 16, 16, device="cuda", dtype=dtype), torch.randn(768, device="cuda", dtype=dtype)
    flops = 2 * 64 * 196 * 768 * 3 * 16 * 16
    return round(flops / (device_ms(lambda: F.conv2d(x, w, b, stride=16)) * 1e-3) / 1e12, 1)


def _bandwidths(launch_us: float) -> dict[str, float]:
    """GB/s per memory-bound kind, bytes read + written, at ViT-B/16 batch-64 sizes in bf16."""
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, y = torch.randn(64 * 197, 768, **bf16), torch.randn(64 * 197, 768, **bf16)
    wide = torch.randn(64 * 197, 3072, **bf16)
    scores = torch.randn(64, 12, 197, 197, **bf16)
    gamma, beta = torch.ones(768, **bf16), torch.zeros(768, **bf16)
    table, ids = torch.randn(50304, 768, **bf16), torch.randint(0, 50304, (64, 1024), device="cuda")
    size = x.numel() * 2
    cases = {
        "pointwise": (lambda: x + y, 3 * size),
        "activation": (lambda: F.gelu(wide), 2 * wide.numel() * 2),
        "norm": (lambda: F.layer_norm(x, (768,), gamma, beta), 2 * size),
        "softmax": (lambda: scores.softmax(-1), 2 * scores.numel() * 2),
        "reduction": (lambda: wide.sum(-1), wide.numel() * 2),
        "copy": (lambda: x.view(64, 197, 12, 64).transpose(1, 2).contiguous(), 2 * size),
        "gather": (lambda: F.embedding(ids, table), 2 * ids.numel() * 768 * 2),
    }
    return {kind: round(nbytes / max(device_ms(fn) * 1e-3 - launch_us * 1e-6, 1e-7) / 1e9, 1)
            for kind, (fn, nbytes) in cases.items()}


def _copy_gbs(gib: float = 1.0) -> float:
    """Device-to-device copy of ``gib`` GiB, bytes read + written per second / 1e9."""
    source = torch.empty(int(gib * 2**30) // 4, device="cuda", dtype=torch.float32)
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / (device_ms(lambda: target.copy_(source)) * 1e-3) / 1e9


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
    return device_ms(graph.replay) * 1e3 / count



class _Repeat(torch.nn.Module):
    """Calls ``op`` ``count`` times on its input (no module calls inside)."""

    def __init__(self, op: Callable, count: int = 200):
        super().__init__()
        self.op, self.count = op, count

    def forward(self, x):
        for _ in range(self.count):
            x = self.op(x)
        return x


class _Block(torch.nn.Module):
    """A pre-norm transformer block (attention + MLP) written the way model code usually is."""

    def __init__(self, width: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv, self.proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.fc1, self.act, self.fc2 = torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width)
        self.dropout = torch.nn.Dropout(0.1)

    def forward(self, x):  # x: (B, S, width)
        b, s, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attention = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, width)
        x = x + self.dropout(self.proj(attention))
        return x + self.dropout(self.fc2(self.act(self.fc1(self.norm2(x)))))


def _host_costs() -> dict[str, float]:
    """Host microseconds: module call, view op, kernel launch (idle / busy), compiled launch."""
    from attnkit.discover.capture import capture
    from attnkit.analyze.partition import partition

    x = torch.zeros(2, 16, 32, device="cuda")
    with torch.no_grad():
        modules = torch.nn.Sequential(*[torch.nn.Identity() for _ in range(200)])
        module_us = host_ms(lambda: modules(x)) * 1e3 / 200
        views = _Repeat(lambda t: t.view(-1).view(2, 16, 32))
        view_us = (host_ms(lambda: views(x)) * 1e3 - module_us) / 400
        block = torch.nn.Sequential(*[_Block() for _ in range(4)]).cuda().eval()
        eager = partition(capture(block, (x,)).graph_module.graph, torch.float32, "eager")
        launches = len(eager.kernels)
        rest_us = (eager.host_ops - launches) * view_us + eager.module_calls * module_us
        idle_us = max(host_ms(lambda: block(x)) * 1e3 - rest_us, 0.0) / launches
        busy_us = max(host_ms(lambda: block(x), busy=True) * 1e3 - rest_us, 0.0) / launches
        compiled = torch.compile(block)
        compiled_us = host_ms(lambda: compiled(x)) * 1e3 / count_kernels(lambda: compiled(x))
    return {"host_module_us": module_us, "host_view_us": view_us, "host_launch_idle_us": idle_us,
            "host_launch_busy_us": busy_us, "compiled_launch_overhead_us": compiled_us}


def _reference_host(host: dict[str, float]) -> dict[str, float]:
    """Host ms of a tiny Hugging Face BERT forward (2 layers, width 32, 1 x 16 tokens, attention mask),
    measured and predicted from ``host``: how much Python a transformers model runs beyond its ATen ops
    and module calls (mask preparation, output dataclasses, a ``padding_mask.all()`` device sync in
    ``create_bidirectional_mask``). Recorded in ``extra``; predictions do not use it yet."""
    from transformers import BertConfig, BertModel

    from attnkit.discover.capture import capture
    from attnkit.analyze.partition import partition

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        attn_implementation="sdpa")
    model = BertModel(config).cuda().eval()
    ids = torch.randint(0, config.vocab_size, (1, 16), device="cuda")
    kwargs = {"attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        eager = partition(capture(model, (ids,), kwargs).graph_module.graph, torch.float32, "eager")
        measured = host_ms(lambda: model(ids, **kwargs))
    launches = len(eager.kernels)
    predicted = (launches * host["host_launch_idle_us"] + (eager.host_ops - launches) * host["host_view_us"]
                 + eager.module_calls * host["host_module_us"]) / 1e3
    return {"bert_tiny_host_ms": round(measured, 3), "bert_tiny_predicted_host_ms": round(predicted, 3),
            "bert_tiny_launches": launches}


def calibrate(log: Callable[[str], None] = print, device: str | None = None) -> HardwareProfile:
    """Measure this machine and return a :class:`HardwareProfile` (save it with ``to_json``).

    Args:
        log: progress lines.
        device: ``"cuda"`` (the current GPU, a few minutes) or ``"cpu"`` (this CPU at
            ``torch.get_num_threads()`` threads, well under a minute); default: CUDA when visible.
    """
    check_arg(device in (None, "cpu", "cuda"), "device", "'cpu', 'cuda' or None", device)
    if device == "cpu" or (device is None and not torch.cuda.is_available()):
        from attnkit.measure.calibrate_cpu import calibrate_cpu

        return calibrate_cpu(log)
    if not torch.cuda.is_available():
        raise UnsupportedError("calibrate --device cuda needs a CUDA GPU (torch.cuda.is_available() is False); "
                               "use --device cpu to measure this CPU.")
    device = torch.cuda.get_device_name()
    base = family_profile(device)
    log("large matmuls (fp32, tf32)")
    rates = {"fp32": round(_matmul_tflops(torch.float32, 4096, False), 1),
             "tf32": round(_matmul_tflops(torch.float32, 8192, True), 1)}
    curves, attention, by_seq, conv, misaligned = {}, {}, {}, {}, {}
    for key in _HALF:
        dtype = parse_dtype(key)
        log(f"GEMM rate vs size, SDPA rate vs sequence, patch convolution ({key})")
        curves[key] = _gemm_curve(dtype)
        rates[key] = curves[key][-1][1]
        by_seq[key] = [[seq, _attention_tflops(dtype, 64, 12, seq)] for seq in _ATTENTION_SEQ]
        attention[key] = _attention_tflops(dtype, 8, 16, 2048)
        conv[key] = _conv_tflops(dtype)
        misaligned[key] = _misaligned_factor(dtype)
    log("device launch cost, bandwidth per kernel kind")
    launch = round(_device_launch_us(), 2)
    bandwidth = _bandwidths(launch)
    copy = round(_copy_gbs(), 1)
    log("host costs (module call, view, launch idle/busy, compiled launch; compiles a small block)")
    host = {key: round(value, 2) for key, value in _host_costs().items()}
    try:
        reference = _reference_host(host)
    except Exception as error:  # a diagnostic: never cost the calibration
        reference = {"bert_tiny_error": f"{type(error).__name__}: {error}"[:200]}
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return HardwareProfile(
        key="calibrated", name=device, kind="gpu",
        peak_tflops=dict(base.peak_tflops), achievable_tflops={**base.achievable_tflops, **rates},
        attention_tflops={**base.attention_tflops, **attention},
        peak_bandwidth_gbs=base.peak_bandwidth_gbs, achievable_bandwidth_gbs=copy,
        launch_overhead_us=launch, **host,
        memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1),
        gemm_tflops_by_size=curves, gemm_misaligned_factor=misaligned, attention_tflops_by_seq=by_seq, conv_tflops=conv, bandwidth_gbs_by_kind=bandwidth,
        source=f"calibrated on {device}, torch {torch.__version__}, {date}",
        extra={"device": device, "torch": torch.__version__, "date": date, "command": " ".join(sys.argv),
               "measured": sorted({*rates, "attention", "bandwidth", "gemm_misaligned_factor", "launch_overhead_us", *host}), "peaks_from": base.key,
               **reference},
    )
