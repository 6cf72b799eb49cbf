"""What this machine can run: versions, GPUs, and which attention, FP8 and distributed pieces actually work.

Every capability is probed with a tiny real call rather than read from a flag, and every probe is
wrapped, so a failure becomes ``ok=False`` with a one-line reason instead of a stack trace::

    report = diagnose()
    report.check("sdpa", "cuda:flash").ok
"""

from __future__ import annotations

import importlib
import platform
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["Check", "GpuInfo", "DoctorReport", "diagnose"]

_SDPA_BACKENDS = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
_PACKAGES = ("transformers", "torchvision", "triton")
_PROBE_SHAPE = (1, 2, 16, 64)  # (B, H, S, D): as small as every kernel accepts
_MAX_REASON = 200


@dataclass(frozen=True)
class Check:
    """One probed capability."""

    group: str
    """``"sdpa"``, ``"flex"``, ``"fp8"``, ``"distributed"`` or ``"packages"``."""
    name: str
    """What was probed, e.g. ``"cuda:flash"`` or ``"transformers"``."""
    ok: bool
    """Whether the call ran (or the package imported)."""
    detail: str
    """What ran or the version when ok, else the reason it failed (one line)."""

    @property
    def status(self) -> str:
        """``"yes"`` or ``"no: <reason>"``."""
        return "yes" if self.ok else f"no: {self.detail}"


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device."""

    index: int
    name: str
    capability: str
    """Compute capability as ``"major.minor"``, e.g. ``"9.0"`` for H100."""
    memory_gib: float


@dataclass(frozen=True)
class DoctorReport:
    """The environment and every probe result; :func:`diagnose` makes one."""

    python: str
    platform: str
    torch: str
    cuda: str | None
    """CUDA version torch was built with; None for a CPU build."""
    cudnn: str | None
    gpus: tuple[GpuInfo, ...]
    checks: tuple[Check, ...]

    def check(self, group: str, name: str) -> Check:
        """The check called ``name`` in ``group``; KeyError when it was not probed here."""
        for check in self.checks:
            if (check.group, check.name) == (group, name):
                return check
        raise KeyError(f"no check {group}/{name}; probed: {[f'{c.group}/{c.name}' for c in self.checks]}")

    def to_json(self) -> dict:
        """A JSON-serialisable dict (``ok`` and ``detail`` per check)."""
        return asdict(self)

    def __repr__(self) -> str:
        passed = sum(check.ok for check in self.checks)
        checks = f"{passed}/{len(self.checks)} ok"
        return f"DoctorReport(torch={self.torch!r}, cuda={self.cuda!r}, gpus={len(self.gpus)}, checks={checks})"


def diagnose() -> DoctorReport:
    """Probe this machine: SDPA backends and FlexAttention on CPU and CUDA, FP8 GEMM, distributed backends, packages.

    Takes a few seconds (importing transformers dominates). Never raises for a failed probe.
    """
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    checks = []
    for device in devices:
        for name, backend in _SDPA_BACKENDS.items():
            checks.append(_probe("sdpa", f"{device}:{name}", lambda d=device, b=backend: _sdpa(d, b)))
    checks += [_probe("flex", device, lambda d=device: _flex(d)) for device in devices]
    checks += [_probe("fp8", device, lambda d=device: _scaled_mm(d)) for device in devices]
    checks += [_probe("distributed", name, lambda n=name: _distributed(n)) for name in ("nccl", "gloo")]
    checks += [_probe("packages", name, lambda n=name: _version(n)) for name in _PACKAGES]
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return DoctorReport(
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=None if cudnn is None else str(cudnn),
        gpus=tuple(_gpu(i) for i in range(torch.cuda.device_count())),
        checks=tuple(checks),
    )


def _probe(group: str, name: str, run: Callable[[], str]) -> Check:
    """``run()`` as a Check: its return value is the detail; an exception becomes the reason."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            detail = run()
        except Exception as error:
            return Check(group, name, False, _reason(error, caught))
    return Check(group, name, True, detail)


def _reason(error: Exception, caught: list[warnings.WarningMessage]) -> str:
    """First sentence of the error, plus that of the last warning (PyTorch explains kernel refusals there)."""
    reason = f"{type(error).__name__}: {_first_sentence(error)}"
    if caught:
        reason += f" ({_first_sentence(caught[-1].message)})"
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 3] + "..."


def _first_sentence(value: object) -> str:
    lines = [line.strip() for line in str(value).splitlines() if line.strip()]
    return lines[0].split(". ")[0] if lines else ""


def _inputs(device: str) -> tuple[torch.Tensor, torch.dtype]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # fused CUDA kernels need 16-bit inputs
    return torch.randn(_PROBE_SHAPE, device=device, dtype=dtype), dtype


def _sdpa(device: str, backend: str) -> str:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, dtype = _inputs(device)
    with sdpa_kernel(getattr(SDPBackend, backend)):
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    _require(bool(torch.isfinite(out).all()), "output is not finite")
    return f"ran {str(dtype).removeprefix('torch.')} {_PROBE_SHAPE}"


def _flex(device: str) -> str:
    from torch.nn.attention.flex_attention import flex_attention

    q, dtype = _inputs(device)
    out = flex_attention(q, q, q)
    _require(bool(torch.isfinite(out).all()), "output is not finite")
    return f"eager call ran {str(dtype).removeprefix('torch.')} (unfused; torch.compile it for speed)"


def _scaled_mm(device: str) -> str:
    a = torch.randn(16, 32, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(16, 32, device=device).to(torch.float8_e4m3fn).t()  # column-major, as cuBLASLt needs
    one = torch.ones((), device=device)
    out = torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    _require(bool(torch.isfinite(out).all()), "output is not finite")
    if device == "cpu":
        return "torch._scaled_mm e4m3 ran on the CPU kernel (correct, not fast; FP8 tensor cores need CUDA sm89+)"
    return "torch._scaled_mm e4m3 x e4m3 -> bf16 ran"


def _distributed(backend: str) -> str:
    import torch.distributed as dist

    _require(dist.is_available(), "torch built without torch.distributed")
    if backend == "gloo":
        _require(dist.is_gloo_available(), "torch built without gloo")
        return "built in"
    _require(dist.is_nccl_available(), "torch built without NCCL (CPU build?)")
    return f"built in, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}"


def _version(package: str) -> str:
    return str(getattr(importlib.import_module(package), "__version__", "imported (no __version__)"))


def _gpu(index: int) -> GpuInfo:
    props = torch.cuda.get_device_properties(index)
    return GpuInfo(index, props.name, f"{props.major}.{props.minor}", round(props.total_memory / 2**30, 1))


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise RuntimeError(reason)
