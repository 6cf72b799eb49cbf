"""Cost model: predicted device time per kernel, host dispatch time per forward, and their overlap.

Device, per kernel (seconds)::

    compute = flops / rate          rate: GEMMs by size (gemm_tflops_by_size, clamped below the
                                    smallest point; times gemm_misaligned_factor when a leading
                                    dimension is not a multiple of 16 bytes), attention by Skv
                                    (attention_tflops_by_seq), convolutions (conv_tflops)
    memory  = bytes / bandwidth     bandwidth of the kernel's kind: pointwise, activation, norm,
                                    softmax, reduction, copy, gather (bandwidth_gbs_by_kind)
    time    = max(compute, memory) + launch_overhead_us

    device = sum of kernel times (the stream runs them back to back)

Host, per forward (seconds): eager dispatches every ATen op from Python::

    host_idle = launches * host_launch_idle_us + non-launching ops * host_view_us
                + nn.Module calls * host_module_us
    host_busy = the same with host_launch_busy_us (a backlogged GPU queue makes launches cheaper)

and a compiled forward pays ``compiled_launch_overhead_us`` per kernel (idle = busy).

Forward on a GPU: the host runs ahead of the device; the device waits only when the host falls
behind. With ``f = max(0, 1 - device / host_busy)``, the fraction of launches that find the queue
empty, ``predicted = max(device, host_busy + f * (host_idle - host_busy))``: ``device`` when the
GPU is the bottleneck, ``host_idle`` when the kernels are tiny, continuous in between.

Forward on a CPU (a profile of kind ``"cpu"``): the same cores dispatch and compute, one op after
the other, so ``predicted = device + host_idle``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from attnkit.analyze.groups import memory_kind
from attnkit.hardware.profiles import HardwareProfile
from attnkit.analyze.partition import Kernel, Partition

__all__ = ["KernelCost", "ModeCost", "kernel_cost", "host_times", "overlap", "estimate"]


@dataclass(frozen=True)
class KernelCost:
    """Predicted time of one kernel, in seconds."""

    compute_s: float
    memory_s: float
    launch_s: float
    bound: str
    """``"compute"`` or ``"memory"``: the larger roofline term (kernels without FLOPs are memory-bound)."""

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.memory_s) + self.launch_s

    def to_json(self) -> dict:
        return {**asdict(self), "time_s": self.time_s}


@dataclass(frozen=True)
class ModeCost:
    """Predicted totals of one execution mode, in seconds."""

    mode: str
    num_kernels: int
    total_flops: int
    total_bytes: int
    device_s: float
    """Sum of kernel times."""
    host_s: float
    """Host dispatch time per forward with the GPU idle (what a launch-bound forward takes)."""
    host_busy_s: float
    """Host dispatch time per forward with the GPU backlogged."""
    kernels: tuple[KernelCost, ...]
    """One per kernel of the partition, same order."""
    serial: bool = False
    """Host and device are the same cores (a CPU): latency = device + host, no overlap."""

    @property
    def predicted_s(self) -> float:
        """Predicted latency per forward (see the module docstring)."""
        if self.serial:
            return self.device_s + self.host_s
        return overlap(self.device_s, self.host_s, self.host_busy_s)

    @property
    def limiter(self) -> str:
        """``"device"`` or ``"host"`` (launch-bound; on a CPU: dispatch takes longer than compute)."""
        if self.serial:
            return "device" if self.device_s >= self.host_s else "host"
        return "device" if self.device_s >= self.predicted_s else "host"

    def __repr__(self) -> str:
        return f"ModeCost({self.mode!r}, kernels={self.num_kernels}, predicted_ms={self.predicted_s * 1e3:.3f})"

    def to_json(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "kernels"}
        return {**data, "predicted_s": self.predicted_s, "limiter": self.limiter}


def overlap(device_s: float, host_idle_s: float, host_busy_s: float) -> float:
    """Forward latency when the host dispatches while the device runs (seconds in, seconds out)."""
    if host_busy_s <= 0:
        return device_s
    empty = max(0.0, 1.0 - device_s / host_busy_s)  # share of launches finding the queue drained
    return max(device_s, host_busy_s + empty * (host_idle_s - host_busy_s))


def kernel_cost(kernel: Kernel, hardware: HardwareProfile, dtype: torch.dtype, *, padded: bool = False) -> KernelCost:
    """Roofline time of one kernel at the achievable rates of ``hardware`` for ``dtype``.

    ``padded``: misaligned GEMMs run at the aligned rate (inductor pads their dimensions to a multiple
    of 16 bytes, ``torch._inductor.config.shape_padding``), else at ``gemm_misaligned_factor`` of it.
    """
    if kernel.category in ("gemm", "qkv-gemm"):
        rate = hardware.gemm_rate(dtype, kernel.flops, kernel.misaligned and not padded)
    elif kernel.category == "attention":
        rate = hardware.attention_rate(dtype, kernel.seq_kv)
    elif kernel.category == "conv":
        rate = hardware.conv_rate(dtype)
    else:
        rate = hardware.matmul_rate(dtype)
    compute = kernel.flops / rate
    memory = kernel.bytes / hardware.kind_bandwidth(memory_kind(kernel))
    bound = "compute" if compute >= memory and compute > 0 else "memory"
    return KernelCost(compute, memory, hardware.launch_overhead_us * 1e-6, bound)


def host_times(partition: Partition, hardware: HardwareProfile) -> tuple[float, float]:
    """``(idle, busy)`` host dispatch seconds per forward of ``partition``."""
    launches = len(partition.kernels)
    if partition.config.fuse_pointwise:
        seconds = launches * hardware.compiled_launch_overhead_us * 1e-6
        return seconds, seconds
    rest = (partition.host_ops - launches) * hardware.host_view_us + partition.module_calls * hardware.host_module_us
    return ((launches * hardware.host_launch_idle_us + rest) * 1e-6,
            (launches * hardware.host_launch_busy_us + rest) * 1e-6)


def estimate(partition: Partition, hardware: HardwareProfile, dtype: torch.dtype) -> ModeCost:
    """Predicted time of every kernel of ``partition`` and the forward total."""
    padded = partition.config.fuse_pointwise  # torch.compile pads misaligned GEMMs
    costs = tuple(kernel_cost(k, hardware, dtype, padded=padded) for k in partition.kernels)
    idle, busy = host_times(partition, hardware)
    return ModeCost(
        mode=partition.mode,
        num_kernels=len(partition.kernels),
        total_flops=partition.total_flops,
        total_bytes=partition.total_bytes,
        device_s=sum(c.time_s for c in costs),
        host_s=idle,
        host_busy_s=busy,
        kernels=costs,
        serial=hardware.kind == "cpu",
    )
