"""Timing that measures device work, not launch queues: CUDA events, warm-up, medians.

On CPU the same functions fall back to ``time.perf_counter`` (results are marked
``"clock": "cpu-wall"``) so callers never branch on the device.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from attnkit.errors import check_arg

__all__ = ["Timing", "time_fn"]


@dataclass(frozen=True)
class Timing:
    """Latency statistics of repeated calls, in milliseconds."""

    median_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float
    repeats: int
    clock: str  # "cuda-events" or "cpu-wall"

    def to_json(self) -> dict:
        return asdict(self)


def _percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def time_fn(fn: Callable[[], object], *, warmup: int = 5, repeats: int = 30, device: torch.device | str | None = None) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` calls.

    On CUDA each call is bracketed by its own pair of events (so p95/p99 are real
    per-call tails); elsewhere by ``perf_counter`` around a synchronous call.

    Args:
        fn: a zero-argument callable doing the work.
        warmup: untimed calls first (compilation, autotuning, allocator warm-up).
        repeats: timed calls; the median is the headline.
        device: where the work runs; defaults to CUDA when available.
    Returns:
        A :class:`Timing` in milliseconds.
    """
    check_arg(isinstance(repeats, int) and repeats >= 1, "repeats", "an int >= 1", repeats)
    check_arg(isinstance(warmup, int) and warmup >= 0, "warmup", "an int >= 0", warmup)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) for start, end in events]
        clock = "cuda-events"
    else:
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
        clock = "cpu-wall"
    ordered = sorted(samples)
    return Timing(
        median_ms=statistics.median(ordered),
        p95_ms=_percentile(ordered, 0.95),
        p99_ms=_percentile(ordered, 0.99),
        min_ms=ordered[0],
        repeats=repeats,
        clock=clock,
    )
