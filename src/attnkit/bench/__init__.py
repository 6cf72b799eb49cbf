"""Timing helpers and benchmarks."""

from attnkit.bench.timing import Timing, time_fn

__all__ = ["Timing", "time_fn"]
