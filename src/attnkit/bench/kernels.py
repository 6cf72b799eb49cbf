"""Kernels per call from ``torch.profiler``: how many a call launches and their device time by group."""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["kernel_stats", "count_kernels"]

_LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel")


def kernel_stats(fn: Callable[[], object], iters: int = 3, group: Callable[[str], str] | None = None) -> tuple[float, dict[str, float]]:
    """CUDA kernels launched per call of ``fn`` (after one warm-up call), memcpy/memset excluded,
    and their device milliseconds per call by kernel group.

    Counts the device-side kernel events; if the profiler surfaced none, counts the host-side
    launch calls (``cudaLaunchKernel``, ``cuLaunchKernel``...) instead (and no group times).

    Args:
        fn: a zero-argument callable launching CUDA work.
        iters: profiled calls; the results are per call.
        group: kernel name -> group name (e.g. :func:`attnkit.analyze.groups.measured_group`);
            None groups by kernel name.
    """
    fn()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset", "[memory]"))]
    groups: dict[str, float] = {}
    for event in kernels:
        name = group(event.name) if group is not None else event.name
        groups[name] = groups.get(name, 0.0) + event.time_range.elapsed_us() / 1e3 / iters
    if not kernels:
        kernels = [e for e in events if e.name.startswith(_LAUNCH_CALLS)]
    return len(kernels) / iters, groups


def count_kernels(fn: Callable[[], object], iters: int = 3) -> float:
    """CUDA kernels launched per call of ``fn`` (see :func:`kernel_stats`)."""
    return kernel_stats(fn, iters)[0]
