"""Text every machine has offline: the Python standard library's own ``*.py`` sources, as bytes.

The one data source of the benchmarks that train a model for real (``sparse/`` quality and
training, ``fp8/convergence.py``); each puts ``benchmarks/`` on ``sys.path`` and imports ``corpus``.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import torch

__all__ = ["corpus"]


def corpus(validation_every: int = 10) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Train and validation bytes (int64 tensors) of the stdlib's .py files, test packages left out,
    and the number of files; a file is held out iff ``crc32(relative path) % validation_every == 0``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, valid, files = [], [], 0
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if "site-packages" in relative or "/test" in relative or relative.startswith("test"):
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        files += 1
        (valid if zlib.crc32(relative.encode()) % validation_every == 0 else train).append(data)
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(valid), files
