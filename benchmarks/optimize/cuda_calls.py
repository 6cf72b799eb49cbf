"""BERT-128 inference (batch 1 unless ``--batch``), eager vs ``optimize``'s rewrite: what each forward asks of CUDA, and its time.

Per model: the CUDA runtime calls (``cudaLaunchKernel``, ``cudaStreamSynchronize``...), top-level ATen ops
and kernels per forward (``torch.profiler``, 5 forwards), then 7 alternating rounds of 30 forwards timed
three ways: CUDA events around each call (synced, ``rewrite_ratio._median_ms``; session 7's run 1 timed them
without its 2 warm-up calls per round), wall time of calls issued back to back, and host wall
time of one call after a sync. Per model also the GPU time of each kernel name per forward, so a rewrite
whose kernels take longer than eager's (a layout a kernel handles slowly) shows by name. ``--backend``
forces one ``attnkit.ops`` backend for the rewrite. Uses only what wave 1 has, so it runs on wave 1's tree too:

    PYTHONPATH=/tmp/wave1/src taskset -c 3 python benchmarks/optimize/cuda_calls.py wave1 $OUT/calls-wave1.json
    PYTHONPATH=src taskset -c 3 python benchmarks/optimize/cuda_calls.py now $OUT/calls-now.json
"""

import argparse
import collections
import json
import statistics
import time
import torch
from torch.profiler import profile, ProfilerActivity
from attnkit.models import build_model
from attnkit.optimize import OptimizeConfig, optimize
from rewrite_ratio import _median_ms  # benchmarks/optimize/rewrite_ratio.py: runs against wave 1's tree too

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("label")
parser.add_argument("out")
parser.add_argument("--batch", type=int, default=1)
parser.add_argument("--backend", default="auto")
args = parser.parse_args()
label, out = args.label, args.out
zoo = build_model("bert-base", batch_size=args.batch, seq_len=128, dtype=torch.bfloat16, device="cuda")
model, inputs, kwargs = zoo.model.eval(), zoo.example_inputs, zoo.example_kwargs
rw, _ = optimize(
    model, inputs, example_kwargs=kwargs, config=OptimizeConfig(dtype=torch.bfloat16, backend=args.backend, check=False, measure=False)
)
fns = {n: (lambda m=m: m(*inputs, **kwargs)) for n, m in (("eager", model), ("rewrite", rw))}
rec = {"label": label, "torch": torch.__version__, "device": torch.cuda.get_device_name(), "batch": args.batch, "backend": args.backend}


def _by_name(kernels) -> dict:
    total = collections.Counter()
    for e in kernels:
        total[e.name[:120]] += e.device_time
    return total


with torch.inference_mode():
    for f in fns.values():
        for _ in range(20):
            f()
    torch.cuda.synchronize()
    for name, f in fns.items():
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                f()
            torch.cuda.synchronize()
        ev = prof.events()
        rt = collections.Counter(e.name for e in ev if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("cu"))
        aten = collections.Counter(
            e.name for e in ev if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
        )
        kern = [e for e in ev if e.device_type == torch.autograd.DeviceType.CUDA]
        rec[name] = {
            "runtime_calls_per_fwd": {k: v / 5 for k, v in sorted(rt.items())},
            "aten_top_per_fwd": {k: v / 5 for k, v in sorted(aten.items())},
            "kernels_per_fwd": len(kern) / 5,
            "kernel_us_per_fwd": sum(e.device_time for e in kern) / 5,
            "kernel_us_by_name_per_fwd": {k: round(v / 5, 2) for k, v in sorted(_by_name(kern).items(), key=lambda item: -item[1])},
        }
    # timing: synced per call (CUDA events) and wall per call back to back; 7 rounds alternating
    synced, b2b = {n: [] for n in fns}, {n: [] for n in fns}
    for r in range(7):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            f = fns[name]
            synced[name].append(_median_ms(f, 30, "cuda"))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(30):
                f()
            torch.cuda.synchronize()
            b2b[name].append((time.perf_counter() - t0) / 30 * 1e3)
            # host-only: wall of the call itself, with a sync before each
            ts = []
            for _ in range(30):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                f()
                ts.append((time.perf_counter() - t0) * 1e3)
            rec.setdefault("host_call_ms", {}).setdefault(name, []).append(statistics.median(ts))
    rec["synced_ms"], rec["back_to_back_ms"] = synced, b2b
    rec["synced_ratio"] = statistics.median(a / b for a, b in zip(synced["eager"], synced["rewrite"]))
    rec["b2b_ratio"] = statistics.median(a / b for a, b in zip(b2b["eager"], b2b["rewrite"]))
    rec["host_call_ratio"] = statistics.median(a / b for a, b in zip(rec["host_call_ms"]["eager"], rec["host_call_ms"]["rewrite"]))
json.dump(rec, open(out, "w"), indent=1)
print(label, "synced", round(rec["synced_ratio"], 3), "b2b", round(rec["b2b_ratio"], 3), "host", round(rec["host_call_ratio"], 3))
for n in fns:
    print(" ", n, "kernels", rec[n]["kernels_per_fwd"], "us", round(rec[n]["kernel_us_per_fwd"], 1), "rt", rec[n]["runtime_calls_per_fwd"])
d = {
    k: rec["rewrite"]["aten_top_per_fwd"].get(k, 0) - rec["eager"]["aten_top_per_fwd"].get(k, 0)
    for k in set(rec["rewrite"]["aten_top_per_fwd"]) | set(rec["eager"]["aten_top_per_fwd"])
}
print("  aten rewrite-eager:", {k: v for k, v in d.items() if v})
for n in fns:
    print(" ", n, "top kernels (us per forward):", dict(list(rec[n]["kernel_us_by_name_per_fwd"].items())[:8]))
