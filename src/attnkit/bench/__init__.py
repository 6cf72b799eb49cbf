"""Timing helpers and benchmarks."""

from attnkit.bench.attention import bench_attention
from attnkit.bench.timing import Timing, time_fn

__all__ = ["Timing", "time_fn", "bench_attention"]
