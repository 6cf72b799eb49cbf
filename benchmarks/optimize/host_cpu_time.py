"""Host CPU time of one BERT-128 forward: eager against ``optimize``'s rewrite from several attnkit trees, in one process.

A host-bound forward's speed is the host's time to issue it. On a shared machine wall-clock host time
swings with the other tenants (the same eager forward took 4.4 to 9.6 ms between processes), so this
also reads the thread's CPU time (``time.thread_time``), which counts only the cycles the forward
itself spent; and every tree runs in the same process, so all face the same host. Other attnkit trees
(e.g. wave 1) are imported under another package name: ``--tree wave1=/tmp/wave1/src/attnkit`` copies
that package to a temporary folder as ``attnkit_wave1`` with its own imports renamed. A tree whose rewrite
registers an attention function with transformers under attnkit's name would replace this tree's in the
shared registry, so such a tree is refused (compare it in separate processes: ``rewrite_ratio.py``).

Per ``--batch``: ``--rounds`` rounds, each timing every variant (order reversed every other round):
one forward after a synchronize (host wall time, host CPU time, time until the GPU is done), and
``--burst`` forwards back to back (wall time per forward: what a serving loop sees). Time spent in
Python's garbage collector, and the host CPU time of one call of the registered attention function
(``sdpa`` or ``attnkit``, timed inside the forwards), are reported per variant. Medians over rounds, and
the median over rounds of each variant's ratio to eager in the same round.

    git archive 37dc3d7 | tar -x -C /tmp/wave1
    PYTHONPATH=src taskset -c 3 python benchmarks/optimize/host_cpu_time.py --tree wave1=/tmp/wave1/src/attnkit --out $OUT/host-cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from attnkit.models import build_model

VARIANTS = {  # attnkit's own tree: name -> OptimizeConfig overrides
    "rewrite": {},
    "rewrite backend=cudnn": {"backend": "cudnn"},
    "rewrite backend=flash": {"backend": "flash"},
    "rewrite backend=efficient": {"backend": "efficient"},
    "interface only": {"fuse_qkv": False},
    "fusion only": {"rewrite_hf": False},
}


def import_tree(name: str, package: Path, into: Path):
    """``<package>`` imported as ``attnkit_<name>`` (a renamed copy, its absolute imports rewritten)."""
    target = into / f"attnkit_{name}"
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__"))
    for file in target.rglob("*.py"):
        text = file.read_text()
        text = re.sub(r"\b(from|import) attnkit(?=[. ])", rf"\1 attnkit_{name}", text)
        file.write_text(re.sub(r"([\"'])attnkit\.", rf"\1attnkit_{name}.", text))
    if str(into) not in sys.path:
        sys.path.insert(0, str(into))
    return importlib.import_module(f"attnkit_{name}.optimize")


class FunctionClock:
    """Thread CPU time spent inside transformers' registered attention functions (``sdpa``, ``attnkit``)
    while ``active``: what one attention call costs the host inside a whole forward."""

    def __init__(self, names: tuple[str, ...]):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.active, self.ns, self.calls = False, 0, 0
        mapping = ALL_ATTENTION_FUNCTIONS._global_mapping  # the class-level registry every model reads
        for name in names:
            mapping[name] = self._wrap(mapping[name])

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            started = time.thread_time_ns()
            out = fn(*args, **kwargs)
            self.ns += time.thread_time_ns() - started
            self.calls += 1
            return out

        return timed


class GcClock:
    """Seconds spent in the garbage collector while ``active``."""

    def __init__(self):
        self.active, self.seconds, self._start = False, 0.0, 0.0
        gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict) -> None:
        if not self.active:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=PATH", help="another attnkit package to compare (its src/attnkit folder)")
    parser.add_argument("--batches", default="64,1")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--burst", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke test of the script")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("needs a CUDA device: it measures the host cost of issuing CUDA work (--device cpu: a smoke test)")
    synchronize = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    import transformers

    from attnkit.optimize import OptimizeConfig, optimize

    zoo = build_model("bert-base", batch_size=max(int(b) for b in args.batches.split(",")), seq_len=128, dtype=torch.bfloat16, device=args.device)
    model, inputs, kwargs = zoo.model.eval(), zoo.example_inputs, zoo.example_kwargs
    first = lambda value, n: value[:n] if isinstance(value, torch.Tensor) else value  # noqa: E731
    one = tuple(first(x, 1) for x in inputs), {k: first(v, 1) for k, v in kwargs.items()}
    models = {"eager": model}
    for name, overrides in VARIANTS.items():
        config = OptimizeConfig(dtype=torch.bfloat16, check=False, measure=False, **overrides)
        models[name] = optimize(model, one[0], example_kwargs=one[1], config=config)[0].eval()
    scratch = Path(tempfile.mkdtemp())
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ours = dict(ALL_ATTENTION_FUNCTIONS._global_mapping)
    for spec in args.tree:
        name, _, path = spec.partition("=")
        other = import_tree(name, Path(path), scratch)
        config = other.OptimizeConfig(dtype=torch.bfloat16, check=False, measure=False)
        models[f"{name} rewrite"] = other.optimize(model, one[0], example_kwargs=one[1], config=config)[0].eval()
        if replaced := [key for key, fn in ours.items() if ALL_ATTENTION_FUNCTIONS._global_mapping.get(key) is not fn]:
            parser.error(f"--tree {name}: its rewrite registered its own {replaced} attention function over this tree's; time it in another process")
    clock, calls = GcClock(), FunctionClock(("sdpa", "attnkit"))
    record = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
        "unit": "ms per forward", "results": {},
    }  # fmt: skip
    with torch.inference_mode():
        for batch in (int(b) for b in args.batches.split(",")):
            ins, kws = tuple(first(x, batch) for x in inputs), {k: first(v, batch) for k, v in kwargs.items()}
            rows = {name: {"host wall": [], "host cpu": [], "synced": [], "back to back": [], "gc": 0.0, "fn": [0, 0]} for name in models}
            for m in models.values():
                for _ in range(5):
                    m(*ins, **kws)
            for r in range(args.rounds):
                for name in list(models) if r % 2 == 0 else list(models)[::-1]:
                    row, m = rows[name], models[name]
                    clock.active, clock.seconds = True, 0.0
                    calls.active, calls.ns, calls.calls = True, 0, 0
                    synchronize()
                    wall, cpu = time.perf_counter(), time.thread_time()
                    m(*ins, **kws)
                    row["host cpu"].append((time.thread_time() - cpu) * 1e3)
                    row["host wall"].append((time.perf_counter() - wall) * 1e3)
                    synchronize()
                    row["synced"].append((time.perf_counter() - wall) * 1e3)
                    started = time.perf_counter()
                    for _ in range(args.burst):
                        m(*ins, **kws)
                    synchronize()
                    row["back to back"].append((time.perf_counter() - started) * 1e3 / args.burst)
                    clock.active = calls.active = False
                    row["fn"][0] += calls.ns
                    row["fn"][1] += calls.calls
                    row["gc"] += clock.seconds * 1e3 / (1 + args.burst) / args.rounds
            result = {}
            for name, row in rows.items():
                fn_ns, fn_calls = row.pop("fn")
                result[name] = {"gc ms per forward": round(row.pop("gc"), 4), "attention fn host cpu us per call": round(fn_ns / fn_calls / 1e3, 2) if fn_calls else None}
                for metric, values in row.items():
                    result[name][f"{metric} median"] = round(statistics.median(values), 4)
                    result[name][f"{metric} eager/this"] = round(statistics.median(e / t for e, t in zip(rows["eager"][metric], values)), 3)
            record["results"][f"batch {batch}"] = result
            for name, entry in result.items():
                print(f"batch {batch} {name:28s}", json.dumps(entry), flush=True)
    args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
