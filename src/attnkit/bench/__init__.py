"""Every timer (CUDA events, device-only, host dispatch, CPU), kernel counts, and the attention benchmark."""

from attnkit.bench.attention import bench_attention
from attnkit.bench.kernels import count_kernels, kernel_stats
from attnkit.bench.race import Entry, race
from attnkit.bench.timing import Timing, cpu_ms, device_ms, host_ms, time_fn

__all__ = [
    # timers
    "Timing", "time_fn", "device_ms", "host_ms", "cpu_ms",
    # interleaved rounds, paired ratios
    "race", "Entry",
    # kernels per call
    "kernel_stats", "count_kernels",
    # benchmarks
    "bench_attention",
]
