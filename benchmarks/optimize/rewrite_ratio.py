"""Eager vs ``optimize``'s rewrite (no compile), raced in one process, for comparing attnkit versions.

Run it once per attnkit tree (``PYTHONPATH=<tree>/src``), alternating the trees, on one machine in
one session: each process reports its rewrite's speed-up over the eager model it timed beside it,
so the ratios of two versions compare even though the two cannot be imported in one process. It
uses only what every version has had (``attnkit.models.build_model``, ``attnkit.optimize.optimize``),
so it runs against the first release's tree too (wave 1, commit 37dc3d7).

Per model and workload: ``--rounds`` rounds, each timing eager and the rewrite (order alternating),
``--repeats`` calls each after 2 warm-up calls, CUDA events per call; a round's ratio is eager's
median over the rewrite's. Inference under ``inference_mode`` at ``--batch`` and at batch 1;
training one SGD step at ``--batch``.

    git archive 37dc3d7 | tar -x -C /tmp/wave1
    PYTHONPATH=/tmp/wave1/src python benchmarks/optimize/rewrite_ratio.py --label wave1 --out $OUT/wave1.json
    PYTHONPATH=src python benchmarks/optimize/rewrite_ratio.py --label now --out $OUT/now.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from attnkit.models import build_model
from attnkit.optimize import OptimizeConfig, optimize
from attnkit.optimize.equivalence import float_tensors  # where wave 1 has it too

CASES = {  # label: (zoo name, seq_len), as benchmarks/optimize/run.py
    "vit_b_16": ("vit_b_16", None),
    "bert-base-128": ("bert-base", 128),
    "bert-base-512": ("bert-base", 512),
    "gpt2-1024": ("gpt2", 1024),
    "llama-gqa-1024": ("llama-gqa", 1024),
}
WORKLOADS = ("infer", "train", "infer-b1")  # infer/train at --batch; infer-b1: one sample (host-bound)


def _slice(value, n: int):
    """The first ``n`` samples of every batched input (``run.py`` and ``host_time.py`` use it too)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value[:n]
    if isinstance(value, (tuple, list)):
        return type(value)(_slice(v, n) for v in value)
    if isinstance(value, dict):
        return {k: _slice(v, n) for k, v in value.items()}
    return value


def _inference_fn(module, inputs, kwargs):
    """One inference call under ``inference_mode`` (``run.py`` and ``host_time.py`` use it too)."""

    def run():
        with torch.inference_mode():
            return module(*inputs, **kwargs)

    return run


def _training_fn(module, inputs, kwargs):
    """One SGD step on the mean of the first floating output (``run.py`` uses it too)."""
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-6)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = float_tensors(module(*inputs, **kwargs))[0]
        torch.mean(out, dtype=torch.float32).backward()
        optimizer.step()

    return step


def _median_ms(fn, repeats: int, device: str) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cpu":
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def race(models: dict, inputs, kwargs, train: bool, args: argparse.Namespace) -> dict:
    for model in models.values():
        model.train(train)
    fns = {name: (_training_fn if train else _inference_fn)(model, inputs, kwargs) for name, model in models.items()}
    ms = {name: [] for name in fns}
    for r in range(args.rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            ms[name].append(_median_ms(fns[name], args.repeats, args.device))
    for model in models.values():
        model.eval()
    ratios = [e / w for e, w in zip(ms["eager"], ms["rewrite"])]
    return {"eager_ms": [round(x, 4) for x in ms["eager"]], "rewrite_ms": [round(x, 4) for x in ms["rewrite"]],
            "ratios": [round(x, 3) for x in ratios], "speedup": round(statistics.median(ratios), 3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="the attnkit tree measured (a name for the record)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke test (wall clock)")
    parser.add_argument("--seq", type=int, help="override every text model's sequence length (smoke tests)")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    workloads = [w for w in args.workloads.split(",") if w]
    if unknown := [m for m in models if m not in CASES] + [w for w in workloads if w not in WORKLOADS]:
        parser.error(f"unknown --models/--workloads {unknown}; choose from {list(CASES)} and {list(WORKLOADS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu for a smoke test)")
    import transformers

    record = {
        "label": args.label, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
        "transformers": transformers.__version__, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv), "batch": args.batch, "dtype": "bf16", "rounds": args.rounds,
        "repeats": args.repeats, "results": {},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for label in models:
        name, seq = CASES[label]
        seq = args.seq if seq is not None and args.seq else seq
        started = time.perf_counter()
        zoo = build_model(name, batch_size=args.batch, seq_len=seq, dtype=torch.bfloat16, device=args.device)
        model, inputs, kwargs = zoo.model.eval(), zoo.example_inputs, zoo.example_kwargs
        config = OptimizeConfig(dtype=torch.bfloat16, check=False, measure=False)
        rewrite, report = optimize(model, _slice(inputs, 1), example_kwargs=_slice(kwargs, 1), config=config)
        entry = {"rewrite": repr(report)[:600]}
        for workload in workloads:
            n = 1 if workload == "infer-b1" else args.batch
            entry[workload] = race({"eager": model, "rewrite": rewrite}, _slice(inputs, n), _slice(kwargs, n), workload == "train", args)
            print(f"[{args.label}] {label} {workload}: rewrite {entry[workload]['speedup']}x eager {entry[workload]['ratios']}", flush=True)
        entry["seconds"] = round(time.perf_counter() - started, 1)
        record["results"][label] = entry
        args.out.write_text(json.dumps(record, indent=1))  # after every model: a cut-short run keeps what it measured
        del model, rewrite, zoo
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
