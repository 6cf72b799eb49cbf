"""Predicted vs measured kernels and latency per forward on a CUDA GPU (eager and torch.compile).

For ViT-B/16, BERT-base and GPT-2 at batch 1 and 64 in bf16 by default; writes one JSON file
``analyze-profile-<device>-<date>.json`` under ``--out`` with device, torch, date and command.
Compiled runs are skipped once ``--time-budget`` seconds are spent, so the script ends in time.

    PYTHONPATH=src python benchmarks/analyze/run_profile.py --out benchmarks/results
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

from attnkit.graph import calibrate, parse_dtype, profile_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Directory for the results JSON.")
    parser.add_argument("--models", nargs="+", default=["vit_b_16", "bert-base", "gpt2"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--hardware", default="h100", help="Profile for the predictions (name or calibrate JSON).")
    parser.add_argument("--calibrate", action="store_true", help="Measure this GPU first and predict with that profile.")
    parser.add_argument("--time-budget", type=float, default=330.0, help="Seconds after which compiled runs are skipped.")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("run_profile.py needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    date = datetime.date.today().isoformat()

    hardware = args.hardware
    if args.calibrate:
        profile = calibrate(log=lambda line: print(f"calibrate: {line}", flush=True))
        hardware = str(args.out / f"hardware-{device}-{date}.json")
        Path(hardware).write_text(json.dumps(profile.to_json(), indent=1))
        print(f"wrote {hardware}", flush=True)

    result = profile_models(args.models, batches=args.batches, dtype=parse_dtype(args.dtype), hardware=hardware,
                            time_budget_s=args.time_budget, log=lambda line: print(line, flush=True))
    command = "PYTHONPATH=src python " + shlex.join(sys.argv)
    result = dataclasses.replace(result, command=command)
    path = args.out / f"analyze-profile-{device}-{date}.json"
    path.write_text(json.dumps(result.to_json(), indent=1))
    print(f"\n{'model':10} {'batch':>5} {'mode':9} {'kernels pred/meas':>18} {'err':>7} {'ms pred/meas':>18} {'err':>7}")
    for r in result.records:
        kernels = f"{r.predicted_kernels}/{r.measured_kernels or 0:.0f}"
        latency = f"{r.predicted_ms:.3f}/{r.measured_ms or 0:.3f}"
        print(f"{r.model:10} {r.batch:5} {r.mode:9} {kernels:>18} {_pct(r.kernel_error):>7} {latency:>18} "
              f"{_pct(r.latency_error):>7} {r.note}")
    print(f"wrote {path}")


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:+.0f}%"


if __name__ == "__main__":
    main()
