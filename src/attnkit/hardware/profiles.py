"""Hardware profiles for the cost model: peak and achievable rates, bandwidth, overheads.

Built-in profiles live in ``hardware_profiles.json`` next to this file (``cpu`` there is a fixed
16-core AVX-512 server, not the machine at hand); ``attnkit calibrate`` writes a profile of the
same shape for the GPU or CPU at hand, which :func:`stored_profile` accepts as a path. Measuring
sits above this module: :func:`attnkit.measure.this_machine.load_hardware` adds ``"this"`` (calibrating
once, then cached).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from attnkit.errors import InvalidArgumentError, check_arg

__all__ = ["DEFAULT_MISALIGNED_FACTOR", "HardwareProfile", "stored_profile", "list_hardware", "family_profile", "dtype_key", "interpolate_log"]

DEFAULT_MISALIGNED_FACTOR = 0.3
"""Rate fraction of a misaligned GEMM when a profile lists none: cuBLAS's non-TMA fallback kernels for
odd leading dimensions run at roughly a quarter to a third of the aligned rate on Hopper (a prior,
replaced by calibrate's measurement)."""

_DATA = Path(__file__).with_name("hardware_profiles.json")
_ALIASES = {"h100": "h100-sxm", "h100-sxm5": "h100-sxm", "a100": "a100-80gb", "generic-cpu": "cpu"}
_DTYPE_KEYS = {
    torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
    torch.float8_e4m3fn: "fp8", torch.float8_e5m2: "fp8",
}


def dtype_key(dtype: torch.dtype) -> str:
    """The rate-table key of ``dtype``: ``torch.bfloat16`` -> ``"bf16"``."""
    check_arg(dtype in _DTYPE_KEYS, "dtype", f"one of {sorted(map(str, _DTYPE_KEYS))}", dtype)
    return _DTYPE_KEYS[dtype]


@dataclass(frozen=True)
class HardwareProfile:
    """One device's rates. TFLOP/s are 1e12 FLOP/s, GB/s are 1e9 B/s, overheads microseconds."""

    key: str
    """Short name (``"h100-sxm"``) or ``"calibrated"``."""
    name: str
    """Human-readable device name."""
    kind: str
    """``"gpu"`` or ``"cpu"``."""
    peak_tflops: dict[str, float]
    """Datasheet dense matmul peak per dtype key (``fp32`` is the non-tensor-core rate)."""
    achievable_tflops: dict[str, float]
    """Matmul rate large GEMMs reach, per dtype key; the cost model uses these."""
    attention_tflops: dict[str, float]
    """Rate fused attention kernels (flash / memory-efficient SDPA) reach, per dtype key."""
    peak_bandwidth_gbs: float
    """Datasheet memory bandwidth."""
    achievable_bandwidth_gbs: float
    """Copy bandwidth reached in practice."""
    launch_overhead_us: float
    """Device-side cost per kernel (launch latency, ramp and tail), added to every kernel."""
    host_launch_idle_us: float
    """Host time of one kernel-launching ATen op called from Python while the GPU queue is empty."""
    host_launch_busy_us: float
    """The same while the GPU is backlogged (launches only append to the queue; cheaper)."""
    host_view_us: float
    """Host time of one ATen op that launches nothing (view, reshape, getitem, no-op dropout)."""
    host_module_us: float
    """Host time of one ``nn.Module`` call (``__call__`` and hooks machinery), its ops excluded."""
    compiled_launch_overhead_us: float
    """Host time per kernel launch of a ``torch.compile``'d forward (inductor wrapper, guards amortised)."""
    memory_gb: float = 0.0
    """Device memory."""
    gemm_tflops_by_size: dict[str, list[list[float]]] = field(default_factory=dict)
    """Per dtype key, ``[[GFLOP of one GEMM, TFLOP/s], ...]`` ascending: small GEMMs fill few SMs.
    Interpolated in log(GFLOP); GEMMs outside the range take the nearest point."""
    attention_tflops_by_seq: dict[str, list[list[float]]] = field(default_factory=dict)
    """Per dtype key, ``[[Skv, TFLOP/s], ...]`` ascending for fused SDPA at head dim 64; short
    sequences run far below the long-sequence rate. Interpolated in log(Skv)."""
    conv_tflops: dict[str, float] = field(default_factory=dict)
    """Rate of convolutions per dtype key (cuDNN, layout transposes included); matmul rate if absent."""
    bandwidth_gbs_by_kind: dict[str, float] = field(default_factory=dict)
    """Achievable bandwidth of memory-bound kernels per kind (``pointwise``, ``activation``, ``norm``,
    ``softmax``, ``reduction``, ``copy``, ``gather``) measured by bytes read + written; the copy
    bandwidth for kinds not listed."""
    gemm_misaligned_factor: dict[str, float] = field(default_factory=dict)
    """Per dtype key, the rate of a GEMM whose leading dimension is not a multiple of 16 bytes (N = 50257)
    as a fraction of the aligned rate: cuBLAS falls back from its TMA/16-byte-vector tensor-core kernels.
    Calibrate measures it (M = 8192, K = 768, N = 50257 vs 50264); :data:`DEFAULT_MISALIGNED_FACTOR` if absent."""
    source: str = "datasheet"
    """``"datasheet"`` or where and when a calibration measured it."""
    extra: dict = field(default_factory=dict)
    """Raw calibration measurements, if any."""

    def __post_init__(self):
        check_arg(self.kind in ("gpu", "cpu"), "kind", '"gpu" or "cpu"', self.kind)
        check_arg(self.achievable_bandwidth_gbs > 0, "achievable_bandwidth_gbs", "a positive number",
                  self.achievable_bandwidth_gbs)
        for key, factor in self.gemm_misaligned_factor.items():
            check_arg(0 < factor <= 1, f"gemm_misaligned_factor[{key!r}]", "a fraction in (0, 1]", factor)
        for name in ("gemm_tflops_by_size", "attention_tflops_by_seq"):
            for key, points in getattr(self, name).items():
                xs = [x for x, _ in points]
                check_arg(bool(points) and xs == sorted(xs) and all(x > 0 and y > 0 for x, y in points),
                          f"{name}[{key!r}]", "[[x, rate], ...] with positive values, x ascending", points)

    def matmul_rate(self, dtype: torch.dtype) -> float:
        """Achievable matmul rate for ``dtype`` in FLOP/s (falls back to fp32 for a missing dtype)."""
        rates = self.achievable_tflops
        return 1e12 * rates.get(dtype_key(dtype), rates.get("fp32", min(rates.values())))

    def gemm_rate(self, dtype: torch.dtype, flops: float, misaligned: bool = False) -> float:
        """Achievable rate in FLOP/s of one GEMM of ``flops`` FLOPs (the size curve, else :meth:`matmul_rate`).

        Below the smallest calibrated GEMM the rate stays at that point's (clamped, never extrapolated
        down): such GEMMs are bound by reading their weights, which the cost model's byte term covers.
        ``misaligned`` (a leading dimension not a multiple of 16 bytes) scales the rate by
        :meth:`misaligned_factor`.
        """
        curve = self.gemm_tflops_by_size.get(dtype_key(dtype))
        rate = 1e12 * interpolate_log(curve, flops / 1e9) if curve else self.matmul_rate(dtype)
        return rate * self.misaligned_factor(dtype) if misaligned else rate

    def misaligned_factor(self, dtype: torch.dtype) -> float:
        """Rate fraction of a GEMM with a leading dimension not a multiple of 16 bytes (see the field)."""
        return self.gemm_misaligned_factor.get(dtype_key(dtype), DEFAULT_MISALIGNED_FACTOR)

    def attention_rate(self, dtype: torch.dtype, seq_kv: int | None = None) -> float:
        """Fused-attention rate in FLOP/s for ``dtype`` at ``seq_kv`` keys (the sequence curve when given
        and listed, else the long-sequence rate; half the matmul rate if neither is listed)."""
        curve = self.attention_tflops_by_seq.get(dtype_key(dtype))
        if curve and seq_kv:
            return 1e12 * interpolate_log(curve, seq_kv)
        rate = self.attention_tflops.get(dtype_key(dtype))
        return 1e12 * rate if rate else self.matmul_rate(dtype) / 2

    def conv_rate(self, dtype: torch.dtype) -> float:
        """Convolution rate in FLOP/s for ``dtype`` (the matmul rate if not listed)."""
        rate = self.conv_tflops.get(dtype_key(dtype))
        return 1e12 * rate if rate else self.matmul_rate(dtype)

    def kind_bandwidth(self, kind: str) -> float:
        """Achievable bandwidth in B/s of a memory-bound kernel of ``kind`` (the copy bandwidth if not listed)."""
        return 1e9 * self.bandwidth_gbs_by_kind.get(kind, self.achievable_bandwidth_gbs)

    @property
    def bandwidth(self) -> float:
        """Achievable memory bandwidth in B/s."""
        return 1e9 * self.achievable_bandwidth_gbs

    def ridge_point(self, dtype: torch.dtype) -> float:
        """Arithmetic intensity (FLOP/byte) where the achievable compute and memory roofs meet."""
        return self.matmul_rate(dtype) / self.bandwidth

    def __repr__(self) -> str:
        key = "bf16" if "bf16" in self.achievable_tflops or self.kind == "gpu" else "fp32"
        return (f"HardwareProfile({self.key!r}, {self.kind}, {key}={self.achievable_tflops.get(key)} TFLOP/s, "
                f"bw={self.achievable_bandwidth_gbs} GB/s)")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, key: str | None = None) -> "HardwareProfile":
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**{"key": key or data.get("key", "custom"), **fields})


def interpolate_log(points: list[list[float]], x: float) -> float:
    """Piecewise-linear in log(x) through ``[[x, y], ...]`` (ascending x), clamped at both ends."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return points[-1][1]


@lru_cache(maxsize=1)
def _builtin() -> dict[str, dict]:
    return {k: v for k, v in json.loads(_DATA.read_text()).items() if not k.startswith("_")}


def family_profile(device_name: str) -> HardwareProfile:
    """The built-in profile whose family appears in ``device_name`` (``"NVIDIA H100 80GB HBM3"`` -> H100), else H100."""
    name = device_name.lower()
    key = next((key for key in _builtin() if key.split("-")[0] in name), "h100-sxm")
    return HardwareProfile.from_json(_builtin()[key], key)


def list_hardware() -> list[str]:
    """Names of the built-in profiles."""
    return list(_builtin())


def stored_profile(hardware: "str | Path | HardwareProfile") -> HardwareProfile:
    """A built-in profile by name or a profile JSON file (no measuring; :func:`attnkit.measure.load_hardware`
    adds ``"this"``, which may calibrate, on top)."""
    if isinstance(hardware, HardwareProfile):
        return hardware
    text = str(hardware)
    key = _ALIASES.get(text.lower(), text.lower())
    if key in _builtin():
        return HardwareProfile.from_json(_builtin()[key], key)
    path = Path(text)
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text())
        base = family_profile(str(data.get("name", ""))).to_json()  # fields an older calibrate did not write
        return HardwareProfile.from_json({**base, **data, "key": data.get("key", "custom")})
    raise InvalidArgumentError("hardware", f"one of {list_hardware()}, 'this' or a profile JSON file", hardware,
                               "Pass 'this' for this machine's measured profile, or run `attnkit calibrate --out "
                               "profile.json` and pass the file.")
