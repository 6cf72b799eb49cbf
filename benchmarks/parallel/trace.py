"""Where one context-parallel fwd+bwd spends its time, per rank: kernel time by kind against the step's wall time.

    PYTHONPATH=src torchrun --nproc-per-node 2 benchmarks/parallel/trace.py --out $OUT \\
        --lengths 32768 --methods "one-gpu cudnn,attnkit ring,attnkit ulysses"

Each (method, length) cell runs the benchmark's own step (``run.py``'s inputs and shards), warms up,
then profiles ``--steps`` steps with ``torch.profiler``. Per rank: the median wall time per step
(CUDA events, ``attnkit.bench.time_fn``), and the GPU time per step of attention kernels, NCCL kernels (which run on their own
stream, so they may overlap the rest) and everything else (copies, merges, casts), plus the ten
longest kernels. ``busy_pct`` = (attention + other) / wall is how full the compute stream is;
what is missing is time the compute stream waited (on a transfer or the host). Writes
``parallel-trace-<device>-<W>gpu-<date>.json`` on rank 0, and rank 0's Chrome trace of each cell.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the benchmark's inputs, methods and environment)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from attnkit.bench import time_fn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

_ATTENTION = ("cudnn", "flash", "fmha", "attention", "sdpa", "sm90_", "cutlass")


def _kind(name: str) -> str:
    lowered = name.lower()
    if "nccl" in lowered:
        return "nccl"
    return "attention" if any(word in lowered for word in _ATTENTION) else "other"


def _cell(args, seq: int, method: str, rank: int, world_size: int, out: Path) -> dict:
    step = bench._one_gpu(args, seq, bench.ONE_GPU[method]) if method in bench.ONE_GPU else bench._attnkit(args, seq, method, rank, world_size)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = time_fn(step, warmup=0, repeats=args.steps, device="cuda").median_ms
    kinds = {"attention": 0.0, "nccl": 0.0, "other": 0.0}
    kernels = []
    for event in prof.key_averages():
        device_us = event.self_device_time_total
        if device_us <= 0 or event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kinds[_kind(event.key)] += device_us / 1000 / args.steps
        kernels.append((device_us / 1000 / args.steps, event.count // args.steps, event.key[:120]))
    if rank == 0:
        prof.export_chrome_trace(str(out / f"trace-{method.replace(' ', '_')}-{seq}-rank0.json"))
    busy = kinds["attention"] + kinds["other"]
    return {
        "wall_ms": wall,
        **{f"{kind}_ms": ms for kind, ms in kinds.items()},
        "busy_pct": 100 * busy / wall,
        "top_kernels": [{"ms": ms, "calls": calls, "name": name} for ms, calls, name in sorted(kernels, reverse=True)[:10]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="32768")
    parser.add_argument("--methods", default="attnkit ring,attnkit ulysses")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("."))
    own, rest = parser.parse_known_args()
    args = bench._args(rest)
    args.steps, args.heads_kv = own.steps, args.heads_kv or args.heads
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=180))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    own.out.mkdir(parents=True, exist_ok=True)
    cells = []
    for seq in bench._ints(own.lengths):
        for method in own.methods.split(","):
            mine = _cell(args, seq, method, rank, world_size, own.out)
            every = [None] * world_size
            dist.all_gather_object(every, mine)
            cells.append({"seq": seq, "method": method, "ranks": every})
            if rank == 0:
                print(f"S={seq} {method}: " + "; ".join(f"rank {r}: wall {c['wall_ms']:.2f} ms, attention {c['attention_ms']:.2f}, "
                                                         f"other {c['other_ms']:.2f}, nccl {c['nccl_ms']:.2f}, busy {c['busy_pct']:.1f}%"
                                                         for r, c in enumerate(every)), flush=True)  # fmt: skip
    if rank == 0:
        device = torch.cuda.get_device_name().replace(" ", "-").lower()
        date = datetime.date.today().isoformat()
        result = {
            "benchmark": "parallel trace", "device": torch.cuda.get_device_name(), "world_size": world_size,
            "torch": torch.__version__, "date": date, "command": "torchrun " + " ".join(sys.argv),
            "shape": {"batch": args.batch, "heads": args.heads, "heads_kv": args.heads_kv or args.heads, "dim": args.dim, "dtype": "bfloat16", "causal": True},
            "cells": cells,
        }  # fmt: skip
        (own.out / f"parallel-trace-{device}-{world_size}gpu-{date}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
