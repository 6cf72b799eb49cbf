"""GPU attention benchmark: every backend and auto over the issue-2 grid, one JSON file.

    python benchmarks/attention/run.py --out benchmarks/results            # ~4 min on an H100
    python benchmarks/attention/run.py --out /tmp/bench --quick            # ~30 s

Writes ``<out>/attention-<device>-<date>.json`` (device, torch, date, command, shapes,
per-backend median ms and TFLOP/s, per-shape best backend and whether auto was within 2%)
prints the table and rules for ``attnkit.ops.auto.RULES`` ordered by what this run measured
(also stored as ``suggested_rules``). Measurements run auto and the SDPA kernels first; when ``--budget-s``
is spent the remaining (slow fallback) measurements are recorded as skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

try:
    import attnkit  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import torch
from rich.console import Console

from attnkit.bench.attention import bench_attention, default_grid, suggest_rules
from attnkit.cli.bench import render


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny grid")
    parser.add_argument("--budget-s", type=float, default=180.0, help="stop starting measurements after this many seconds")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--backends", default=None, help="comma-separated; default all but reference")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        # FlexAttention is compiled for static shapes: one graph per grid shape and pass, more
        # than dynamo's default recompile limit (8; the names changed in torch 2.6).
        config = torch._dynamo.config
        for name, limit in (
            ("cache_size_limit", 256),
            ("recompile_limit", 256),
            ("accumulated_cache_size_limit", 1024),
            ("accumulated_recompile_limit", 1024),
        ):
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), limit))
    console = Console()

    def progress(record) -> None:
        result = f"{record.tflops:8.1f} TFLOP/s" if record.tflops is not None else f"skipped: {record.skipped}"
        console.print(f"{record.backend:>9}  {record.shape.label:<28} {result}", highlight=False)

    report = bench_attention(
        grid=default_grid(quick=args.quick, device=device),
        backends=tuple(args.backends.split(",")) if args.backends else None,
        device=device,
        repeats=args.repeats,
        budget_s=args.budget_s,
        progress=progress,
    )
    console.print(render(report))
    misses = [s.shape.label for s in report.summaries if s.auto_within_tolerance is False]
    console.print(f"auto within 2% of the best on {len(report.summaries) - len(misses)}/{len(report.summaries)} shapes")
    for label in misses:
        console.print(f"  miss: {label}")
    rules = [repr(rule) for rule in suggest_rules(report)]
    console.print("rules measured here, for RULES in src/attnkit/ops/auto.py (ahead of the generic cuda rule):", highlight=False)
    for rule in rules:
        console.print(f"    {rule},", highlight=False, soft_wrap=True)
    slug = re.sub(r"[^a-z0-9]+", "-", report.device.lower()).strip("-")
    path = args.out / f"attention-{slug}-{datetime.date.today().isoformat()}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**report.to_json(), "suggested_rules": rules}, indent=1))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
