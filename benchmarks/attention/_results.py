"""The JSON record every script in this folder writes: device, torch, date and command, then its own fields."""

from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path

import torch


def header(device: str) -> dict:
    """``device``, ``torch``, ``date`` (UTC) and ``command`` of this run."""
    return {
        "device": device,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def write(record: dict, out: Path | None, name: str, *, indent: int = 2) -> None:
    """``<out>/<name>-<device slug>-<date>.json`` (nothing when ``out`` is None)."""
    if out is None:
        return
    slug = re.sub(r"[^a-z0-9]+", "-", record["device"].lower()).strip("-")
    path = out / f"{name}-{slug}-{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=indent) + "\n")
    print(f"wrote {path}")
