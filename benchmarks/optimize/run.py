"""`attnkit optimize` on a GPU: eager, torch.compile (several modes), rewrite, rewrite + compile, and what `optimize` picks.

Grid (bf16): ViT-B/16, ViT-L/16, BERT-base (seq 128 and 512), GPT-2 (seq 1024), the Llama-style GQA
decoder (seq 1024); inference at batch 64 and 1, and one training step (forward, backward, SGD) at
batch 64. Per cell:

1. every variant is built with :func:`attnkit.optimize.build_variants` (what ``optimize(select=True)``
   races): ``eager``, ``rewrite`` and, per compile mode of the workload (``--modes-b64``,
   ``--modes-b1``, ``--modes-train``), ``compile[:mode]`` and ``rewrite+compile[:mode]``; the first
   call (compilation, autotuning) is timed apart;
2. all variants are raced (:func:`attnkit.bench.race`: ``--rounds`` interleaved rounds of
   ``--warmup`` + ``--repeats`` calls, paired ratio to eager per round);
3. ``attnkit optimize`` applies ``optimize``'s rule (:func:`attnkit.optimize.pick`: faster than eager
   in every round by >= 2%, else eager) and the pick is **re-timed in a fresh process** against
   eager (same race), which is the number the "never slower than eager" verdict reads;
4. every variant's kernels are profiled by group (GEMM, attention, norm, elementwise... from
   :func:`attnkit.analyze.groups.measured_group`) plus its top kernels: where the time goes.

Each model is checked once (``optimize``'s equivalence report at batch 1). Work runs in priority
order (inference b64, training b64, inference b1) and the JSON is rewritten after every cell, so a
run cut by ``--budget-s`` keeps every finished cell. Models can be split over the GPUs of one host
(one process per GPU, ``CUDA_VISIBLE_DEVICES``) and the files joined with ``--merge``.

Usage::

    PYTHONPATH=src python benchmarks/optimize/run.py --out /tmp/x --models vit_b_16 --budget-s 300
    PYTHONPATH=src python benchmarks/optimize/run.py --merge a.json b.json --out benchmarks/results/optimize
    PYTHONPATH=src python benchmarks/optimize/run.py --table benchmarks/results/optimize/<file>.json
    PYTHONPATH=src python benchmarks/optimize/run.py --out /tmp/x --quick --device cpu   # smoke test
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

from attnkit.analyze.groups import measured_group
from attnkit.bench import race
from attnkit.bench.kernels import kernel_stats
from attnkit.models import build_model
from attnkit.optimize import Candidate, OptimizeConfig, build_variants, optimize, pick

# benchmarks/optimize/rewrite_ratio.py runs against older attnkit trees too, so it holds these helpers
from rewrite_ratio import _inference_fn, _slice, _training_fn

CASES = {  # label: (zoo name, seq_len)
    "vit_b_16": ("vit_b_16", None),
    "vit_l_16": ("vit_l_16", None),
    "bert-base-128": ("bert-base", 128),
    "bert-base-512": ("bert-base", 512),
    "gpt2-1024": ("gpt2", 1024),
    "llama-gqa-1024": ("llama-gqa", 1024),
}
PICKED = "attnkit optimize"


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="directory for the JSON record")
    parser.add_argument("--table", type=Path, help="print the Markdown table of an existing record and exit")
    parser.add_argument("--merge", type=Path, nargs="+", help="join records of one host (models split over GPUs) into one under --out")
    parser.add_argument("--models", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--workloads", default="infer-b64,train-b64,infer-b1", help="in priority order (b64 = --batch)")
    parser.add_argument("--modes-b64", default="default,max-autotune-no-cudagraphs", help="compile modes raced at inference batch --batch")
    parser.add_argument("--modes-b1", default="default,reduce-overhead", help="compile modes raced at inference batch 1")
    parser.add_argument("--modes-train", default="default", help="compile modes raced for the training step")
    parser.add_argument("--batch", type=int, default=64, help="the large batch (inference and training)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new cells after this many seconds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--backend", default="auto", help="attnkit.ops backend for the optimized attention")
    parser.add_argument("--no-check", action="store_true", help="skip the equivalence check")
    parser.add_argument("--no-profile", action="store_true", help="skip the kernel profiles")
    parser.add_argument("--no-retime", action="store_true", help="skip the fresh-process re-time of the pick")
    parser.add_argument("--retime", nargs=3, metavar=("MODEL", "WORKLOAD", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="batch 2, seq 32, 2 rounds of 1: a smoke test of this script")
    args = parser.parse_args()
    if args.out is None and args.table is None and args.retime is None:
        parser.error("--out DIR is required (or --table FILE)")
    args.models = [m for m in args.models.split(",") if m]
    args.workloads = [w.replace("b64", f"b{args.batch}") for w in args.workloads.split(",") if w]
    unknown = [m for m in args.models if m not in CASES]
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {list(CASES)}")
    if args.quick:
        args.batch, args.warmup, args.repeats, args.rounds = 2, 0, 1, 2
        args.workloads = [w.replace("b64", "b2") for w in args.workloads]
    return args


def _dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _modes(workload: str, args: argparse.Namespace) -> tuple[str, ...]:
    text = args.modes_train if workload.startswith("train") else args.modes_b1 if workload == "infer-b1" else args.modes_b64
    return tuple(m for m in text.split(",") if m and m != "none")


class Case:
    """One model: the original and its optimized copy (``optimize`` with the equivalence check)."""

    def __init__(self, label: str, args: argparse.Namespace, record: dict | None, check: bool):
        name, seq = CASES[label]
        if args.quick and seq is not None:
            seq = 32
        self.label = label
        started = time.perf_counter()
        zoo = build_model(name, batch_size=args.batch, seq_len=seq, dtype=_dtype(args.dtype), device=args.device)
        self.model, self.inputs, self.kwargs = zoo.model, zoo.example_inputs, zoo.example_kwargs
        config = OptimizeConfig(dtype=_dtype(args.dtype), backend=args.backend, check=check, measure=False)
        self.optimized, report = optimize(self.model, _slice(self.inputs, 1), example_kwargs=_slice(self.kwargs, 1), config=config)
        self.passed = report.passed
        if record is not None:
            record["models"][label] = {
                "zoo": name, "seq_len": seq, "source": zoo.source, "notes": zoo.notes,
                "params_m": round(sum(p.numel() for p in self.model.parameters()) / 1e6, 1),
                "optimize_report": report.to_json(), "setup_s": round(time.perf_counter() - started, 1),
            }  # fmt: skip
            print(f"[{label}] built + optimized in {time.perf_counter() - started:.1f}s: {report!r}", flush=True)

    def variants(self, workload: str, args: argparse.Namespace, only: str | None = None) -> dict:
        """name -> (zero-argument callable, eligible) for this workload; ``only``: eager and that one."""
        torch._dynamo.reset()  # a fresh compile per cell, as a user of `optimize` gets
        batch = 1 if workload == "infer-b1" else args.batch
        inputs, kwargs = _slice(self.inputs, batch), _slice(self.kwargs, batch)
        train = workload.startswith("train")
        for module in (self.model, self.optimized):
            module.train(train)
        built = build_variants(self.model, self.optimized, _modes(workload, args), self.passed)
        if only is not None:
            built = {name: built[name] for name in ("eager", only)}
        return {name: ((_training_fn if train else _inference_fn)(module, inputs, kwargs), eligible) for name, (module, eligible) in built.items()}


def _sync(args) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def _first_calls(fns: dict, args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """Run each variant once (compilation); returns (ready fns, first-call seconds, errors)."""
    ready, first, errors = {}, {}, {}
    for name, (fn, _) in fns.items():
        started = time.perf_counter()
        try:
            fn()
            _sync(args)
            ready[name] = fn
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - one failing variant must not lose the cell
            if name == "eager":
                raise
            errors[name] = f"{type(error).__name__}: {str(error)[:300]}"
            print(f"    {name} FAILED: {errors[name]}", flush=True)
        first[name] = round(time.perf_counter() - started, 2)
    return ready, first, errors


def _profile(fn, iters: int = 3) -> dict:
    """Device ms per call by kernel group, the kernel count and the top kernels."""
    count, by_kernel = kernel_stats(fn, iters=iters)
    groups: dict[str, float] = {}
    for name, ms in by_kernel.items():
        groups[measured_group(name)] = groups.get(measured_group(name), 0.0) + ms
    top = sorted(by_kernel.items(), key=lambda item: -item[1])[:8]
    return {
        "device_ms": sum(by_kernel.values()), "kernels_per_call": count,
        "groups_ms": dict(sorted(groups.items(), key=lambda item: -item[1])),
        "top_kernels": [{"kernel": name[:120], "ms": ms} for name, ms in top],
    }  # fmt: skip


def _retime(label: str, workload: str, variant: str, args: argparse.Namespace) -> dict:
    """Race ``variant`` against eager in a fresh Python process (what a user's next run gets)."""
    command = [sys.executable, __file__, "--retime", label, workload, variant, "--batch", str(args.batch), "--dtype", args.dtype,
               "--device", args.device, "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
               "--backend", args.backend, "--modes-b64", args.modes_b64, "--modes-b1", args.modes_b1, "--modes-train", args.modes_train]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command + (["--quick"] if args.quick else []), capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout)[-400:], "seconds": round(time.perf_counter() - started, 1)}
    result = json.loads(lines[-1])
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _retime_main(args: argparse.Namespace) -> None:
    label, workload, variant = args.retime
    case = Case(label, args, None, check=False)
    fns = case.variants(workload, args, only=variant)
    ready, first, errors = _first_calls(fns, args)
    if errors:
        print(json.dumps({"error": errors[variant]}))
        return
    entries = race(ready, baseline="eager", rounds=args.rounds, repeats=args.repeats, warmup=args.warmup, device=args.device)
    print(json.dumps({"variant": variant, "first_call_s": first[variant], **entries[variant].to_json(), "eager_median_ms": entries["eager"].median_ms}))


def _measure_cell(case: Case, workload: str, args: argparse.Namespace) -> dict:
    fns = case.variants(workload, args)
    ready, first, errors = _first_calls(fns, args)
    entries = race(ready, baseline="eager", rounds=args.rounds, repeats=args.repeats, warmup=args.warmup, device=args.device)
    batch = 1 if workload == "infer-b1" else args.batch
    candidates = []
    cell = {"model": case.label, "workload": workload, "batch": batch, "variants": {}}
    for name, (fn, eligible) in fns.items():
        entry = entries.get(name)
        data = {"first_call_s": first.get(name), "eligible": eligible}
        if entry is None:
            data["error"] = errors.get(name, "did not run")
            candidates.append(Candidate(name, None, eligible, f"failed: {data['error']}"))
        else:
            data.update(entry.to_json(), samples_per_s=batch / entry.median_ms * 1e3)
            candidates.append(Candidate.from_entry(entry, eligible))
        cell["variants"][name] = data
    picked, summary = pick(candidates)
    cell["picked"], cell["pick_summary"] = picked, summary
    print(f"[{case.label}] {workload}: " + ", ".join(
        f"{n} {d['speedup']:.2f}x" if d.get("speedup") else f"{n} failed" for n, d in cell["variants"].items()) + f" -> {summary}", flush=True)
    if args.device.startswith("cuda") and not args.no_profile:
        for name, fn in ready.items():
            try:
                cell["variants"][name]["profile"] = _profile(fn)
            except Exception as error:  # noqa: BLE001 - a profile is extra information
                cell["variants"][name]["profile"] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
    del fns, ready
    _free(args)
    if not args.no_retime and picked != "eager":
        cell["retime"] = _retime(case.label, workload, picked, args)
        r = cell["retime"]
        print(f"[{case.label}] {workload}: fresh process {picked}: " + (f"{r['speedup']:.2f}x ({r['wins']}/{r['rounds']})" if "speedup" in r else r["error"][-200:]), flush=True)
    return cell


def _free(args) -> None:
    torch._dynamo.reset()
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()


def _summary_row(cell: dict) -> dict:
    """Speed-ups over eager, the best compile mode, the pick (in the race and from a fresh process), the verdicts."""
    variants = cell["variants"]
    speed = {name: v.get("speedup") for name, v in variants.items()}
    compiled = {n: s for n, s in speed.items() if n.startswith("compile") and s}
    best_compile = max(compiled, key=compiled.get, default=None)
    picked = cell["picked"]
    retime = cell.get("retime", {})
    fresh = 1.0 if picked == "eager" else retime.get("speedup")
    row = {
        "model": cell["model"], "workload": cell["workload"], "speedups": speed, "best_compile": best_compile,
        "best_compile_speedup": compiled.get(best_compile), "picked": picked, "picked_speedup": speed.get(picked) or 1.0,
        "fresh_process_speedup": fresh,
    }  # fmt: skip
    row["not_slower"] = None if fresh is None else fresh >= 0.99
    row["vs_best_compile"] = None if not best_compile else row["picked_speedup"] / compiled[best_compile]
    return row


def markdown_table(record: dict) -> str:
    """The README table, read from a record: samples/s of eager and speed-ups per variant family."""
    lines = [
        f"{record['device']}, torch {record['torch']}, {record['dtype']}, {record['date'][:10]} (`{record['command']}`); "
        f"{record.get('rounds', '?')} interleaved rounds per cell, x = median paired ratio to eager",
        "",
        "| model | workload | eager (samples/s) | best torch.compile | rewrite | best rewrite+compile | attnkit optimize (pick) | pick re-timed, fresh process |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for cell, row in zip(record["cells"], record["summary"]):
        v = cell["variants"]
        best = lambda prefix: max(((n, s) for n, s in row["speedups"].items() if n.startswith(prefix) and s), key=lambda x: x[1], default=None)  # noqa: E731
        text = lambda pair: "-" if not pair else f"{pair[1]:.2f}x ({pair[0].partition(':')[2] or 'default'})"  # noqa: E731
        rewrite = row["speedups"].get("rewrite")
        fresh = row["fresh_process_speedup"]
        lines.append(
            f"| {row['model']} | {row['workload']} | {v['eager'].get('samples_per_s', 0):,.0f} | {text(best('compile'))} | "
            f"{'-' if not rewrite else f'{rewrite:.2f}x'} | {text(best('rewrite+compile'))} | {row['picked']} {row['picked_speedup']:.2f}x | "
            f"{'-' if fresh is None else f'{fresh:.2f}x'} |"
        )
    slower = [f"{r['model']} {r['workload']}" for r in record["summary"] if r["not_slower"] is False]
    ahead = [r for r in record["summary"] if r["vs_best_compile"] is not None]
    lines += ["", f"Never slower than eager (fresh process, 1% noise): {'yes' if not slower else 'no: ' + ', '.join(slower)} ({len(record['summary'])} cells). "
              f"At least as fast as the best compile mode: {sum(r['vs_best_compile'] >= 0.99 for r in ahead)} of {len(ahead)} cells."]
    return "\n".join(lines)


def _device_name(args) -> str:
    return torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"


def _path(out: Path, device: str, suffix: str = "") -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    return out / f"optimize-{slug}-{dt.date.today().isoformat()}{suffix}.json"


def _merge(args: argparse.Namespace) -> None:
    records = [json.loads(p.read_text()) for p in args.merge]
    merged = {k: v for k, v in records[0].items() if k not in ("models", "cells", "summary", "skipped", "command", "elapsed_s")}
    merged["commands"] = [c for r in records for c in r.get("commands") or [{"command": r["command"], "gpu": r.get("gpu"), "elapsed_s": r.get("elapsed_s")}]]
    merged["command"] = records[0]["command"].split(" --models")[0] + " --models ... (one process per GPU, merged with --merge)"
    merged["note"] = ("models split over GPUs of one host (and runs of one day on one GPU model, when an input was merged already), processes "
                      "run side by side; every cell's variants ran on one GPU in one process")
    for key in ("models", "cells", "summary", "skipped"):
        merged[key] = {} if key == "models" else []
        for r in records:
            merged[key] = {**merged[key], **r[key]} if key == "models" else merged[key] + r[key]
    args.out.mkdir(parents=True, exist_ok=True)
    path = _path(args.out, merged["device"])
    path.write_text(json.dumps(merged, indent=1, default=str))
    print(markdown_table(merged))
    print(f"wrote {path}")


def main() -> None:
    args = _parse()
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return
    # A cell may need several graphs (train/eval, ops' shape guards): keep them all (the default
    # limit of 8 would silently fall back to eager).
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    if args.retime is not None:
        _retime_main(args)
        return
    if args.merge:
        _merge(args)
        return
    started = time.perf_counter()
    device = _device_name(args)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ("-quick" if args.quick else "") + ("" if len(args.models) == len(CASES) else "-" + "+".join(args.models))
    path = _path(args.out, device, suffix)
    record = {
        "device": device, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "PYTHONPATH=src python " + " ".join(shlex.quote(a) for a in sys.argv),
        "dtype": args.dtype, "batch": args.batch, "budget_s": args.budget_s, "rounds": args.rounds, "repeats": args.repeats,
        "modes": {"infer-b64": args.modes_b64, "infer-b1": args.modes_b1, "train": args.modes_train},
        "models": {}, "cells": [], "skipped": [],
    }  # fmt: skip
    try:
        import transformers

        record["transformers"] = transformers.__version__
    except ImportError:
        pass

    def save() -> None:
        record["elapsed_s"] = round(time.perf_counter() - started, 1)
        record["summary"] = [_summary_row(cell) for cell in record["cells"]]
        path.write_text(json.dumps(record, indent=1, default=str))

    cases: dict[str, Case] = {}
    for workload in args.workloads:
        for label in args.models:
            if time.perf_counter() - started > args.budget_s:
                record["skipped"].append({"model": label, "workload": workload, "reason": f"time budget {args.budget_s:.0f}s"})
                continue
            try:
                if label not in cases:
                    cases[label] = Case(label, args, record, check=not args.no_check)
                record["cells"].append(_measure_cell(cases[label], workload, args))
            except Exception as error:  # noqa: BLE001 - one failing cell must not lose the others
                record["skipped"].append({"model": label, "workload": workload, "reason": f"{type(error).__name__}: {str(error)[:300]}"})
                print(f"[{label}] {workload} FAILED: {type(error).__name__}: {error}", flush=True)
            finally:
                _free(args)
            save()
    save()
    if record["cells"]:
        print(markdown_table(record))
    print(f"wrote {path} ({record['elapsed_s']}s)")


if __name__ == "__main__":
    main()
