"""``--hardware this``: the measured profile of the machine at hand, calibrated once and cached, and
:func:`load_hardware`, which resolves every ``--hardware`` value (names and files via
:func:`attnkit.hardware.profiles.stored_profile`).

The cache file is ``$XDG_CACHE_HOME/attnkit/hardware-<id>.json`` (``~/.cache/attnkit`` by default),
``<id>`` naming the device, the thread count (CPU) and the torch version: a profile measured with
other threads or another BLAS build does not describe this process.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from attnkit.hardware.profiles import HardwareProfile, stored_profile

__all__ = ["load_hardware", "this_machine", "cache_path"]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80] or "unknown"


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cache_path(device: str | None = None) -> Path:
    """Where the profile of this machine's ``device`` (``"cuda"`` or ``"cpu"``; default: CUDA if visible) is cached."""
    from attnkit.measure.calibrate_cpu import cpu_name

    device = device or _device()
    torch_version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if device == "cuda":
        identity = f"gpu-{_slug(torch.cuda.get_device_name())}-torch{torch_version}"
    else:
        identity = f"cpu-{_slug(cpu_name())}-{torch.get_num_threads()}t-torch{torch_version}"
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnkit"
    return root / f"hardware-{identity}.json"


def this_machine(log: Callable[[str], None] | None = None, *, refresh: bool = False) -> HardwareProfile:
    """The profile of this machine: its CUDA GPU when one is visible, else its CPU at ``torch.get_num_threads()``.

    Read from :func:`cache_path`; the first call (or ``refresh=True``) calibrates and writes it
    (CPU: well under a minute; GPU: the full :func:`attnkit.measure.calibrate` run, a few minutes).
    """
    from attnkit.measure.calibrate import calibrate

    path = cache_path()
    if path.is_file() and not refresh:
        try:
            return replace(HardwareProfile.from_json(json.loads(path.read_text())), key="this")
        except (OSError, ValueError, TypeError):  # unreadable or from an older attnkit: measure again
            pass
    profile = calibrate(log=log or (lambda _: None), device=_device())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_json(), indent=1))
    return replace(profile, key="this")


def load_hardware(hardware: str | Path | HardwareProfile) -> HardwareProfile:
    """A built-in profile by name (``h100``, ``h200``, ``a100``, ``l4``, ``cpu``: a fixed 16-core AVX-512
    server), ``"this"`` (this machine's GPU, else its CPU at the current thread count: measured on first
    use and cached, see :func:`this_machine`) or a JSON file from calibrate."""
    if isinstance(hardware, str) and hardware.lower() == "this":
        return this_machine()
    return stored_profile(hardware)
