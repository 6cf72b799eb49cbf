"""Predicted vs measured kernels and latency per forward on a CUDA GPU (eager and torch.compile).

For ViT-B/16, BERT-base and GPT-2 at batch 1 and 64 in bf16 by default; writes one JSON file
``analyze-profile-<device>-<date>.json`` under ``--out`` with device, torch, date, command, the
hardware profile the predictions used (measured first with ``--calibrate``), and per record the
predicted and measured kernels, latency, host time and device time per kernel group, plus errors
(a failing model is a record with a note, not a crash). Compiled runs are skipped once
``--time-budget`` seconds are spent, so the script ends in time (about 7 minutes on an H100).

    PYTHONPATH=src python benchmarks/analyze/run_profile.py --out benchmarks/results/analyze --calibrate
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import shlex
import sys
from pathlib import Path

import torch

from attnkit.measure import calibrate, load_hardware, profile_models
from attnkit.utils import parse_dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Directory for the results JSON.")
    parser.add_argument("--models", nargs="+", default=["vit_b_16", "bert-base", "gpt2"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--hardware", default="h100", help="Profile for the predictions (name or calibrate JSON).")
    parser.add_argument("--calibrate", action="store_true", help="Measure this GPU first and predict with that profile.")
    parser.add_argument("--time-budget", type=float, default=300.0,
                        help="Seconds of profiling after which compiled runs are skipped (calibration not counted).")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("run_profile.py needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    date = datetime.date.today().isoformat()

    hardware, profile, notes = args.hardware, load_hardware(args.hardware), []
    if args.calibrate:
        try:
            profile = calibrate(log=lambda line: print(f"calibrate: {line}", flush=True))
            hardware = str(args.out / f"hardware-{device}-{date}.json")
            Path(hardware).write_text(json.dumps(profile.to_json(), indent=1))
            print(f"wrote {hardware}", flush=True)
        except Exception as error:  # predictions fall back to --hardware; the measurements still run
            notes.append(f"calibrate failed, predicted with {args.hardware}: {type(error).__name__}: {error}")
            print(notes[-1], flush=True)

    result = profile_models(args.models, batches=args.batches, dtype=parse_dtype(args.dtype), hardware=profile,
                            time_budget_s=args.time_budget, log=lambda line: print(line, flush=True))
    command = "PYTHONPATH=src python " + shlex.join(sys.argv)
    result = dataclasses.replace(result, command=command, hardware=hardware,
                                 extra={**result.extra, "hardware_profile": profile.to_json(), "notes": notes})
    path = args.out / f"analyze-profile-{device}-{date}.json"
    path.write_text(json.dumps(result.to_json(), indent=1))
    _print_table(result.records)
    print(f"wrote {path}")


def _print_table(records) -> None:
    """Predicted/measured kernels and latency per record, then the error per kernel group."""
    print(f"\n{'model':10} {'batch':>5} {'mode':9} {'kernels pred/meas':>18} {'err':>6} {'ms pred/meas':>18} {'err':>6}  "
          "errors by part (host, device, groups)")
    for r in records:
        kernels = f"{_num(r.predicted_kernels, 0)}/{_num(r.measured_kernels, 0)}"
        latency = f"{_num(r.predicted_ms, 3)}/{_num(r.measured_ms, 3)}"
        parts = " ".join(f"{name} {_pct(error)}" for name, error in r.group_errors().items() if error is not None)
        print(f"{r.model:10} {r.batch:5} {r.mode:9} {kernels:>18} {_pct(r.kernel_error):>6} {latency:>18} "
              f"{_pct(r.latency_error):>6}  {parts} {r.note}")


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:+.0f}%"


if __name__ == "__main__":
    main()
