"""Run `attnkit validate` on the reference models and write the JSON reports, Markdown and plots.

On the H100 (what the lead runs; ~6 minutes)::

    PYTHONPATH=src python benchmarks/validate/run.py --out benchmarks/results

Tiny CPU mode (checks the script end to end in about a minute)::

    PYTHONPATH=src python benchmarks/validate/run.py --out /tmp/validate --tiny

Writes per model and dtype ``validate-<model>-<dtype>-<device>-<date>.json`` (the
``ValidationReport``), the same as ``.md``, PNG plots under ``plots/``, and one summary
``validate-<device>-<date>.json`` with device, torch, date, command and each run's time.
torch.compile is checked in the first dtype of each model only (its cost is minutes, not seconds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from attnkit.validate import ValidateConfig, render, save_plots, validate

MODELS = ("vit_b_16", "bert-base", "llama-gqa")
DTYPES = ("bfloat16", "float16")
BUDGET_S = 60.0  # the bound for a default run of ViT-B/16 and BERT-base on an H100


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON reports, Markdown and plots")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated zoo names (default {','.join(MODELS)})")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated dtypes (default bfloat16,float16)")
    parser.add_argument("--preset", default="default", help="ValidateConfig preset (default: default)")
    parser.add_argument("--backends", default=None, help="comma-separated backends to test (default: all but reference)")
    parser.add_argument("--seed", type=int, default=None, help="accuracy input seed (default: fresh, recorded in each report)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: quick preset, short sequences, fp32 and bf16")
    return parser.parse_args()


def main() -> int:
    args = _arguments()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.machine()
    date = datetime.date.today().isoformat()
    dtypes = ("float32", "bfloat16") if args.tiny else tuple(args.dtypes.split(","))
    preset = "quick" if args.tiny else args.preset
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for model in args.models.split(","):
        for index, dtype in enumerate(dtypes):
            overrides = {"seed": args.seed, "backends": tuple(args.backends.split(",")) if args.backends else None}
            if index > 0:
                overrides["compile_backends"] = ()
            config = ValidateConfig.preset(preset, **overrides)
            shape = {"seq_len": 32} if args.tiny and not model.startswith("vit") else {}
            torch._dynamo.reset()  # flex compiles once per shape; runs must not share dynamo's recompile budget
            started = time.perf_counter()
            report = validate(model, dtype=dtype, device=device, config=config, progress=lambda line: print(f"  [{model} {dtype}] {line}", flush=True), **shape)
            seconds = time.perf_counter() - started
            stem = f"validate-{model}-{dtype}-{device}-{date}"
            report.save(args.out / f"{stem}.json")
            (args.out / f"{stem}.md").write_text(report.to_markdown())
            plots = [str(p) for p in save_plots(report, args.out / "plots")]
            render(report)
            within = "" if args.tiny or model not in ("vit_b_16", "bert-base") else (" (within budget)" if seconds <= BUDGET_S else f" (OVER the {BUDGET_S:.0f} s budget)")
            print(f"== {model} {dtype}: {'PASS' if report.passed else 'FAIL'} in {seconds:.1f} s{within}; stages {({k: round(v, 1) for k, v in report.stage_seconds.items()})}", flush=True)
            runs.append({"model": model, "dtype": dtype, "seconds": seconds, "passed": report.passed, "stage_seconds": report.stage_seconds,
                         "failures": [f"{r.backend}: {r.case}: {r.reason}" for r in report.failures], "report": f"{stem}.json", "plots": plots})  # fmt: skip
    summary = {
        "device": device_name,
        "torch": torch.__version__,
        "date": date,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "preset": preset,
        "runs": runs,
    }
    path = args.out / f"validate-{device}-{date}.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    for run in runs:
        print(f"{run['model']:>10} {run['dtype']:>9}: {'PASS' if run['passed'] else 'FAIL'} {run['seconds']:6.1f} s")
    print(f"summary: {path}; total {sum(r['seconds'] for r in runs):.1f} s")
    return 0 if all(run["passed"] for run in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
