"""Hardware profiles for the cost model: peak and achievable rates, bandwidth, overheads.

Built-in profiles live in ``hardware_profiles.json`` next to this file; ``attnkit calibrate``
writes a profile of the same shape for the GPU at hand, which :func:`load_hardware` accepts
as a path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from attnkit.errors import InvalidArgumentError, check_arg

__all__ = ["HardwareProfile", "load_hardware", "list_hardware", "dtype_key", "parse_dtype"]

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


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"``, ``"bfloat16"``, ``"fp32"``, ``"float16"``... -> the torch dtype."""
    by_key = {key: dtype for dtype, key in reversed(list(_DTYPE_KEYS.items()))}
    text = str(name).lower().removeprefix("torch.")
    dtype = by_key.get(text) or getattr(torch, text, None)
    check_arg(isinstance(dtype, torch.dtype) and dtype in _DTYPE_KEYS, "dtype",
              f"one of {sorted(by_key)} or a torch dtype name such as 'bfloat16'", name)
    return dtype


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
    """Device-side cost per kernel (launch latency and tail), added to every kernel."""
    eager_op_overhead_us: float
    """Host time PyTorch eager spends per dispatched ATen op (views included)."""
    compiled_launch_overhead_us: float
    """Host time per kernel launch of a compiled forward."""
    memory_gb: float = 0.0
    """Device memory."""
    source: str = "datasheet"
    """``"datasheet"`` or where and when a calibration measured it."""
    extra: dict = field(default_factory=dict)
    """Raw calibration measurements, if any."""

    def __post_init__(self):
        check_arg(self.kind in ("gpu", "cpu"), "kind", '"gpu" or "cpu"', self.kind)
        check_arg(self.achievable_bandwidth_gbs > 0, "achievable_bandwidth_gbs", "a positive number",
                  self.achievable_bandwidth_gbs)

    def matmul_rate(self, dtype: torch.dtype) -> float:
        """Achievable matmul rate for ``dtype`` in FLOP/s (falls back to fp32 for a missing dtype)."""
        rates = self.achievable_tflops
        return 1e12 * rates.get(dtype_key(dtype), rates.get("fp32", min(rates.values())))

    def attention_rate(self, dtype: torch.dtype) -> float:
        """Achievable fused-attention rate for ``dtype`` in FLOP/s (half the matmul rate if not listed)."""
        rate = self.attention_tflops.get(dtype_key(dtype))
        return 1e12 * rate if rate else self.matmul_rate(dtype) / 2

    @property
    def bandwidth(self) -> float:
        """Achievable memory bandwidth in B/s."""
        return 1e9 * self.achievable_bandwidth_gbs

    def ridge_point(self, dtype: torch.dtype) -> float:
        """Arithmetic intensity (FLOP/byte) where the achievable compute and memory roofs meet."""
        return self.matmul_rate(dtype) / self.bandwidth

    def __repr__(self) -> str:
        return (f"HardwareProfile({self.key!r}, bf16={self.achievable_tflops.get('bf16')} TFLOP/s, "
                f"bw={self.achievable_bandwidth_gbs} GB/s)")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, key: str | None = None) -> "HardwareProfile":
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**{"key": key or data.get("key", "custom"), **fields})


@lru_cache(maxsize=1)
def _builtin() -> dict[str, dict]:
    return {k: v for k, v in json.loads(_DATA.read_text()).items() if not k.startswith("_")}


def list_hardware() -> list[str]:
    """Names of the built-in profiles."""
    return list(_builtin())


def load_hardware(hardware: "str | Path | HardwareProfile") -> HardwareProfile:
    """A built-in profile by name (``h100``, ``h200``, ``a100``, ``l4``, ``cpu``) or a JSON file from calibrate."""
    if isinstance(hardware, HardwareProfile):
        return hardware
    text = str(hardware)
    key = _ALIASES.get(text.lower(), text.lower())
    if key in _builtin():
        return HardwareProfile.from_json(_builtin()[key], key)
    path = Path(text)
    if path.suffix == ".json" and path.is_file():
        return HardwareProfile.from_json(json.loads(path.read_text()))
    raise InvalidArgumentError("hardware", f"one of {list_hardware()} or a profile JSON file", hardware,
                               "Run `attnkit calibrate --out profile.json` to measure this GPU.")
