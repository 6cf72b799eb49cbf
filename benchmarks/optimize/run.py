"""`attnkit optimize` on a GPU: eager, torch.compile, rewrite, rewrite + torch.compile and what `optimize` picks, side by side.

Grid (bf16): ViT-B/16, ViT-L/16, BERT-base (seq 128 and 512), GPT-2 (seq 1024), the Llama-style GQA
decoder (seq 1024); inference at batch 1 and 64 and one training step (forward, backward, SGD) at
batch 64. Work is done in priority order and the JSON is rewritten after every cell, so a run cut
short by ``--budget-s`` (default 420 s; compile time counts; the cell running at the deadline finishes) still leaves every finished number:

1. inference batch 64, all four variants (the headline);
2. training batch 64, eager and rewrite;
3. inference batch 1, all four variants;
4. training batch 64, torch.compile and rewrite + torch.compile.

``rewrite`` is the model `optimize` rewrites (fused QKV attention on the best backend, patchify
convolution as a GEMM). After the variants of a cell, the column ``attnkit optimize`` applies
``optimize(..., config.select=True)``'s rule (:func:`attnkit.optimize.pick`: the fastest variant that
passed the equivalence checks, the original when nothing beats it) to the cell's medians and times the
picked variant again; the summary's "never slower than eager" is read from that column. (``select``
itself measures the same variants the same way; reusing the cell's timings keeps the run within budget.)

Each model is also checked once (``optimize``'s equivalence report at batch 1: fp32 and bf16 rules,
eval and train) and ViT-B/16 at batch 64 is profiled (top CUDA kernels per variant).

Usage (H100, about 8 minutes)::

    PYTHONPATH=src python benchmarks/optimize/run.py --out benchmarks/results
    PYTHONPATH=src python benchmarks/optimize/run.py --out /tmp/x --models vit_b_16 --budget-s 200
    PYTHONPATH=src python benchmarks/optimize/run.py --out /tmp/x --quick --device cpu   # smoke test
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

from attnkit.bench import time_fn
from attnkit.models import build_model
from attnkit.optimize import Candidate, OptimizeConfig, optimize, pick
from attnkit.optimize.compare import float_tensors

CASES = {  # label: (zoo name, seq_len)
    "vit_b_16": ("vit_b_16", None),
    "vit_l_16": ("vit_l_16", None),
    "bert-base-128": ("bert-base", 128),
    "bert-base-512": ("bert-base", 512),
    "gpt2-1024": ("gpt2", 1024),
    "llama-gqa-1024": ("llama-gqa", 1024),
}
VARIANTS = ("eager", "compile", "rewrite", "rewrite+compile")
PICKED = "attnkit optimize"
"""The column of the variant `optimize`'s select rule picks in each cell, timed again."""


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="directory for the JSON record")
    parser.add_argument("--table", type=Path, help="print the Markdown table of an existing record and exit")
    parser.add_argument("--models", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--batch", type=int, default=64, help="the large batch (inference and training)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new cells after this many seconds")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--backend", default="auto", help="attnkit.ops backend for the optimized attention")
    parser.add_argument("--no-check", action="store_true", help="skip the equivalence check")
    parser.add_argument("--no-profile", action="store_true", help="skip the ViT-B/16 kernel profile")
    parser.add_argument("--quick", action="store_true", help="batch 2, seq 32, 1 repeat: a smoke test of this script")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of both compiled variants")
    args = parser.parse_args()
    if args.out is None and args.table is None:
        parser.error("--out DIR is required (or --table FILE)")
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [m for m in args.models if m not in CASES] + [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown --models/--variants {unknown}; choose from {list(CASES)} and {list(VARIANTS)}")
    if args.quick:
        args.batch, args.warmup, args.repeats = 2, 1, 1
    return args


def _dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _slice(value, n: int):
    """The first ``n`` samples of every batched input."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value[:n]
    if isinstance(value, (tuple, list)):
        return type(value)(_slice(v, n) for v in value)
    if isinstance(value, dict):
        return {k: _slice(v, n) for k, v in value.items()}
    return value


class Case:
    """One model: the original, the optimized copy, and their compiled wrappers (built lazily)."""

    def __init__(self, label: str, args: argparse.Namespace, record: dict):
        name, seq = CASES[label]
        if args.quick and seq is not None:
            seq = 32
        self.label, self.args = label, args
        started = time.perf_counter()
        zoo = build_model(name, batch_size=args.batch, seq_len=seq, dtype=_dtype(args.dtype), device=args.device)
        self.model, self.inputs, self.kwargs = zoo.model, zoo.example_inputs, zoo.example_kwargs
        config = OptimizeConfig(dtype=_dtype(args.dtype), backend=args.backend, check=not args.no_check, measure=False)
        self.optimized, report = optimize(self.model, _slice(self.inputs, 1), example_kwargs=_slice(self.kwargs, 1), config=config)
        self.passed = report.passed
        self.compiled: dict[str, torch.nn.Module] = {}
        record["models"][label] = {
            "zoo": name, "seq_len": seq, "source": zoo.source, "notes": zoo.notes,
            "params_m": round(sum(p.numel() for p in self.model.parameters()) / 1e6, 1),
            "optimize_report": report.to_json(), "setup_s": round(time.perf_counter() - started, 1),
        }  # fmt: skip
        print(f"[{label}] built + optimized in {time.perf_counter() - started:.1f}s: {report!r}", flush=True)

    def module(self, variant: str) -> torch.nn.Module:
        base = self.optimized if variant.startswith("rewrite") else self.model
        if not variant.endswith("compile"):
            return base
        if variant not in self.compiled:
            mode = None if self.args.compile_mode == "default" else self.args.compile_mode
            self.compiled[variant] = torch.compile(base, dynamic=False, mode=mode)
        return self.compiled[variant]


def _inference_fn(module, inputs, kwargs):
    def run():
        with torch.inference_mode():
            return module(*inputs, **kwargs)

    return run


def _training_fn(module, inputs, kwargs):
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-6)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = float_tensors(module(*inputs, **kwargs))[0]
        torch.mean(out, dtype=torch.float32).backward()
        optimizer.step()

    return step


def _measure(case: Case, workload: str, variant: str, args: argparse.Namespace) -> dict:
    batch = 1 if workload == "infer-b1" else args.batch
    inputs, kwargs = _slice(case.inputs, batch), _slice(case.kwargs, batch)
    if variant.endswith("compile"):
        # A fresh compile per measurement, as a user of `optimize` gets: graphs cached by earlier
        # cells (other shapes, train/eval, the other model sharing these code objects) otherwise
        # add guard checks and recompiles that showed up as 2x swings between two timings of one variant.
        torch._dynamo.reset()
        case.compiled.clear()
    module = case.module(variant)
    train = workload.startswith("train")
    (case.optimized if variant.startswith("rewrite") else case.model).train(train)
    fn = (_training_fn if train else _inference_fn)(module, inputs, kwargs)
    started = time.perf_counter()
    fn()  # first call: compilation for the compiled variants
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    first_s = time.perf_counter() - started
    timing = time_fn(fn, warmup=args.warmup, repeats=args.repeats, device=args.device)
    case.model.eval()
    case.optimized.eval()
    return {
        "model": case.label, "workload": workload, "batch": batch, "variant": variant,
        "median_ms": timing.median_ms, "p95_ms": timing.p95_ms, "samples_per_s": batch / timing.median_ms * 1e3,
        "first_call_s": round(first_s, 2), "clock": timing.clock,
    }  # fmt: skip


def _plan(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    eager_like = [v for v in args.variants if not v.endswith("compile")]
    compiled = [v for v in args.variants if v.endswith("compile")]
    big = args.batch
    phases = [
        (f"infer-b{big}", args.variants),
        (f"train-b{big}", eager_like),
        ("infer-b1", args.variants),
        (f"train-b{big}", compiled),
    ]
    picked = [PICKED] if "eager" in args.variants else []
    return [(label, workload, v) for workload, variants in phases if variants for label in args.models for v in (*variants, *picked)]


def _measure_pick(case: Case, workload: str, results: list[dict], args: argparse.Namespace) -> dict:
    """Time again the variant `optimize`'s select rule picks from this cell's measured variants."""
    cell = {r["variant"]: r["median_ms"] for r in results if r["model"] == case.label and r["workload"] == workload and r["variant"] in VARIANTS}
    candidates = [Candidate(v, ms, eligible=case.passed or not v.startswith("rewrite")) for v, ms in cell.items()]
    name, summary = pick(candidates)
    result = _measure(case, workload, name, args)
    result.update(variant=PICKED, picked=name, pick_summary=summary)
    return result


def _profile(case: Case, args: argparse.Namespace) -> dict:
    """Top CUDA kernels of one batch-``args.batch`` inference per variant (what holds the time)."""
    case.model.eval()
    case.optimized.eval()
    from torch.profiler import ProfilerActivity, profile

    result = {}
    inputs, kwargs = case.inputs, case.kwargs
    for variant in args.variants:
        fn = _inference_fn(case.module(variant), inputs, kwargs)
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        device_us = lambda e: getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)  # noqa: E731
        events = sorted(prof.key_averages(), key=device_us, reverse=True)
        total = sum(device_us(e) for e in events if device_us(e) > 0) or 1.0
        result[variant] = [
            {"kernel": e.key[:120], "ms_per_iter": device_us(e) / 3e3, "share": device_us(e) / total, "calls_per_iter": e.count / 3}
            for e in events[:15]
        ]
    return result


def _summary(results: list[dict], args: argparse.Namespace) -> list[dict]:
    """Per cell: speedups over eager, the pick, and whether the pick is slower than eager (beyond 1% noise)."""
    rows = []
    for label in args.models:
        for workload in (f"infer-b{args.batch}", f"train-b{args.batch}", "infer-b1"):
            cell = {r["variant"]: r for r in results if r["model"] == label and r["workload"] == workload}
            if "eager" not in cell:
                continue
            eager = cell["eager"]["median_ms"]
            row = {"model": label, "workload": workload, **{f"{v.replace(' ', '_')}_speedup": eager / r["median_ms"] for v, r in cell.items()}}
            if PICKED in cell:
                picked = cell[PICKED]
                row.update(picked=picked["picked"], not_slower=picked["picked"] == "eager" or picked["median_ms"] <= eager * 1.01)
            rows.append(row)
    return rows


_COLUMNS = (*VARIANTS, PICKED)


def _cells(results: list[dict]) -> dict[tuple, dict]:
    """``(model, workload) -> {variant: result}`` in the order measured."""
    cells: dict[tuple, dict] = {}
    for r in results:
        cells.setdefault((r["model"], r["workload"]), {})[r["variant"]] = r
    return cells


def _text(row: dict, variant: str, markdown: bool) -> str:
    r = row.get(variant)
    if r is None:
        return "-"
    eager = row.get("eager")
    text = f"{r['samples_per_s']:,.0f}" if markdown else f"{r['samples_per_s']:.1f}"
    if eager is not None and variant != "eager":
        text += f" ({r['samples_per_s'] / eager['samples_per_s']:.2f}x)" if markdown else f" {r['samples_per_s'] / eager['samples_per_s']:.2f}x"
    if variant == PICKED:
        text += f" {r['picked']}"
    return text


def _print_table(results: list[dict]) -> None:
    print(f"\n{'model':16} {'workload':10} " + " ".join(f"{v:>17}" for v in VARIANTS) + f"   {PICKED} (samples/s, x = vs eager)")
    for (model, workload), row in _cells(results).items():
        print(f"{model:16} {workload:10} " + " ".join(f"{_text(row, v, False):>17}" for v in VARIANTS) + f"   {_text(row, PICKED, False)}")


def markdown_table(record: dict) -> str:
    """The README table: samples/s per variant and speedup over eager, read from a record."""
    summary = record.get("summary", [])
    picked = [row for row in summary if "not_slower" in row]
    lines = [
        f"{record['device']}, torch {record['torch']}, {record['dtype']}, {record['date'][:10]} (`{record['command']}`)",
        "",
        "| model | workload | " + " | ".join(_COLUMNS) + " |",
        "|---|---|" + "---:|" * len(_COLUMNS),
    ]
    for (model, workload), row in _cells(record["results"]).items():
        lines.append(f"| {model} | {workload} | " + " | ".join(_text(row, v, True) for v in _COLUMNS) + " |")
    if picked:
        slower = [f"{row['model']} {row['workload']}" for row in picked if not row["not_slower"]]
        lines += ["", f"attnkit optimize never slower than eager: {'yes' if not slower else 'no (' + ', '.join(slower) + ')'} ({len(picked)} cells)"]
    return "\n".join(lines)


def main() -> None:
    args = _parse()
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return
    # Within one measurement a variant may need several graphs (train/eval, ops' shape guards): keep
    # them all (the default limit of 8 would silently fall back to eager).

    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    started = time.perf_counter()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    today = dt.date.today().isoformat()
    slug = "".join(c if c.isalnum() else "-" for c in device_name.lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"optimize-{slug}-{today}{'-quick' if args.quick else ''}.json"
    record = {
        "device": device_name, "torch": torch.__version__, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "PYTHONPATH=src python " + " ".join(shlex.quote(a) for a in sys.argv),
        "dtype": args.dtype, "batch": args.batch, "budget_s": args.budget_s, "models": {}, "results": [], "skipped": [],
    }  # fmt: skip
    try:
        import transformers

        record["transformers"] = transformers.__version__
    except ImportError:
        pass

    def save() -> None:
        record["elapsed_s"] = round(time.perf_counter() - started, 1)
        record["summary"] = _summary(record["results"], args)
        verdicts = [row["not_slower"] for row in record["summary"] if "not_slower" in row]
        record["never_slower_than_eager"] = all(verdicts) if verdicts else None
        path.write_text(json.dumps(record, indent=1, default=str))

    cases: dict[str, Case] = {}
    for label, workload, variant in _plan(args):
        if time.perf_counter() - started > args.budget_s:
            record["skipped"].append({"model": label, "workload": workload, "variant": variant, "reason": f"time budget {args.budget_s:.0f}s"})
            continue
        try:
            if label not in cases:
                cases[label] = Case(label, args, record)
            if variant == PICKED:
                result = _measure_pick(cases[label], workload, record["results"], args)
                # Training cells are picked twice (after the eager and after the compiled variants): keep the last.
                record["results"] = [r for r in record["results"] if (r["model"], r["workload"], r["variant"]) != (label, workload, PICKED)]
            else:
                result = _measure(cases[label], workload, variant, args)
            record["results"].append(result)
            shown = f"{variant} ({result['picked']})" if variant == PICKED else variant
            print(f"[{label}] {workload:9} {shown:17} {result['median_ms']:9.3f} ms  {result['samples_per_s']:10.1f}/s  (first call {result['first_call_s']}s)", flush=True)
        except Exception as error:  # noqa: BLE001 - one failing cell must not lose the others
            record["skipped"].append({"model": label, "workload": workload, "variant": variant, "reason": f"{type(error).__name__}: {str(error)[:300]}"})
            print(f"[{label}] {workload} {variant} FAILED: {type(error).__name__}: {error}", flush=True)
        finally:
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        save()
    if "vit_b_16" in cases and args.device.startswith("cuda") and not args.no_profile and time.perf_counter() - started < args.budget_s + 60:
        record["profile_vit_b_16_infer"] = _profile(cases["vit_b_16"], args)
    save()
    _print_table(record["results"])
    print(f"\n{PICKED} never slower than eager: {record['never_slower_than_eager']}")
    print(f"wrote {path} ({record['elapsed_s']}s)")


if __name__ == "__main__":
    main()
