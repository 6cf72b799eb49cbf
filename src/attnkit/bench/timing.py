"""Every timer of attnkit: device work, host dispatch, and CPU compute, in milliseconds.

* :func:`time_fn`: per-call CUDA events after warm-up (p95/p99 tails); on CPU ``time.perf_counter``
  (results marked ``"clock": "cpu-wall"``) so callers never branch on the device.
* :func:`device_ms`: device time only, every call queued behind a sleeping kernel (calibration).
* :func:`host_ms`: host wall time of calls that do not synchronise (dispatch and launch cost).
* :func:`cpu_ms`: the fastest CPU time of a call on a shared machine (CPU calibration).

Kernel counts from the profiler are in :mod:`attnkit.bench.kernels`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from attnkit.errors import check_arg

__all__ = ["SLEEP_CYCLES", "Timing", "time_fn", "device_ms", "host_ms", "cpu_ms"]

SLEEP_CYCLES = 100_000_000
"""Cycles of the sleeping kernel queued before timed calls (~50 ms on a 2 GHz GPU: longer than any
host loop timed behind it)."""


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


def device_ms(fn: Callable[[], object], repeats: int = 15) -> float:
    """Median device milliseconds of ``fn()`` on CUDA, the host kept out of the measurement.

    A sleeping kernel is queued first, so every call is enqueued before the GPU reaches it and the
    events around a call bracket only its kernels. Without it a small GEMM (M = 128..197, ~2-5 us on
    the GPU) times the ~40 us it takes Python to dispatch it, and a size curve reads 5 TFLOP/s.
    """
    for _ in range(3):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def host_ms(fn: Callable[[], object], *, busy: bool = False, repeats: int = 15) -> float:
    """Median host wall time of ``fn()`` on CUDA in ms, not synchronising inside it.

    ``busy=True`` first queues a sleeping kernel so every launch of ``fn`` finds the GPU backlogged.
    """
    fn()
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        if busy:
            torch.cuda._sleep(SLEEP_CYCLES)
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(samples)


def _cpu_clock() -> Callable[[], float]:
    """``time.thread_time`` with one torch thread (the op runs on this thread: its CPU time is its wall time
    on an idle machine, whatever the neighbours do), else ``time.perf_counter``."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def cpu_ms(fn: Callable[[], object], budget_s: float = 0.4, repeats: int = 30) -> float:
    """Fastest milliseconds of ``fn()`` on the CPU after warm-up, over ``repeats`` calls or ``budget_s``
    wall seconds, whichever ends first (at least 5). The fastest, not the median: on a shared machine a
    call that loses a core to another process mid-way (an OpenMP barrier waits for it) measures the
    neighbours, not the CPU."""
    for _ in range(2):
        fn()
    clock, samples, deadline = _cpu_clock(), [], time.perf_counter() + budget_s
    while len(samples) < repeats and (len(samples) < 5 or time.perf_counter() < deadline):
        start = clock()
        fn()
        samples.append((clock() - start) * 1e3)
    return min(samples)
