"""Roofline cost model: predicted time per kernel and per forward.

Per kernel: ``time = max(flops / achievable rate, bytes / achievable bandwidth) + launch
overhead`` (device side; attention kernels use the fused-attention rate, others the matmul
rate). Per forward: the device runs kernels back to back while the host dispatches them, so ``predicted = max(sum of kernel times, host dispatch time)``,
where host dispatch = ops dispatched x per-op host overhead (eager: every ATen op, views
included; compiled: one launch per kernel).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from attnkit.graph.hardware import HardwareProfile
from attnkit.graph.partition import Kernel, Partition

__all__ = ["KernelCost", "ModeCost", "kernel_cost", "estimate"]


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
    """Predicted totals of one execution mode."""

    mode: str
    num_kernels: int
    total_flops: int
    total_bytes: int
    device_s: float
    """Sum of kernel times."""
    host_s: float
    """Host dispatch time per forward."""
    kernels: tuple[KernelCost, ...]
    """One per kernel of the partition, same order."""

    @property
    def predicted_s(self) -> float:
        """Predicted latency per forward: the slower of device work and host dispatch."""
        return max(self.device_s, self.host_s)

    @property
    def limiter(self) -> str:
        """``"device"`` or ``"host"`` (launch-bound)."""
        return "device" if self.device_s >= self.host_s else "host"

    def __repr__(self) -> str:
        return f"ModeCost({self.mode!r}, kernels={self.num_kernels}, predicted_ms={self.predicted_s * 1e3:.3f})"

    def to_json(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "kernels"}
        return {**data, "predicted_s": self.predicted_s, "limiter": self.limiter}


def kernel_cost(kernel: Kernel, hardware: HardwareProfile, dtype: torch.dtype) -> KernelCost:
    """Roofline time of one kernel at the achievable rates of ``hardware`` for ``dtype``.

    Attention kernels run at the fused-attention rate, everything else at the matmul rate.
    """
    rate = hardware.attention_rate(dtype) if kernel.category == "attention" else hardware.matmul_rate(dtype)
    compute = kernel.flops / rate
    memory = kernel.bytes / hardware.bandwidth
    bound = "compute" if compute >= memory and compute > 0 else "memory"
    return KernelCost(compute, memory, hardware.launch_overhead_us * 1e-6, bound)


def estimate(partition: Partition, hardware: HardwareProfile, dtype: torch.dtype) -> ModeCost:
    """Predicted time of every kernel of ``partition`` and the forward total."""
    costs = tuple(kernel_cost(k, hardware, dtype) for k in partition.kernels)
    per_op = hardware.compiled_launch_overhead_us if partition.config.fuse_pointwise else hardware.eager_op_overhead_us
    return ModeCost(
        mode=partition.mode,
        num_kernels=len(partition.kernels),
        total_flops=partition.total_flops,
        total_bytes=partition.total_bytes,
        device_s=sum(c.time_s for c in costs),
        host_s=partition.host_ops * per_op * 1e-6,
        kernels=costs,
    )
