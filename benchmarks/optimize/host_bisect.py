"""Which part of ``optimize``'s rewrite costs host time in a whole BERT-128 forward: the attention interface or the fusion.

Four variants in one process, bf16 inference on CUDA: eager (transformers' ``sdpa``), the rewrite, the
attention interface alone (``fuse_qkv=False``) and the Q/K/V fusion alone (``rewrite_hf=False``). Each
round times one forward of every variant (order alternating): the host time to issue it after a
synchronize, and the time until its GPU work is done. Reported: medians, minimums, and the median over
rounds of each variant's host time over eager's in the same round.

    PYTHONPATH=src taskset -c 3 python benchmarks/optimize/host_bisect.py --batch 64 --out $OUT/host-bisect.json
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

VARIANTS = {"rewrite": {}, "interface only": {"fuse_qkv": False}, "fusion only": {"rewrite_hf": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device: it measures the host cost of issuing CUDA work")
    if args.batch < 1 or args.rounds < 1:
        parser.error(f"--batch and --rounds must be >= 1, got {args.batch} and {args.rounds}")
    zoo = build_model("bert-base", batch_size=args.batch, seq_len=128, dtype=torch.bfloat16, device="cuda")
    model, inputs, kwargs = zoo.model.eval(), zoo.example_inputs, zoo.example_kwargs
    one = tuple(x[:1] for x in inputs), {k: v[:1] for k, v in kwargs.items()}
    models = {"eager": model}
    for name, overrides in VARIANTS.items():
        config = OptimizeConfig(dtype=torch.bfloat16, check=False, measure=False, **overrides)
        models[name] = optimize(model, one[0], example_kwargs=one[1], config=config)[0]
    host, synced = {n: [] for n in models}, {n: [] for n in models}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(10):
                m(*inputs, **kwargs)
        for r in range(args.rounds):
            for name in list(models) if r % 2 == 0 else list(models)[::-1]:
                torch.cuda.synchronize()
                start = time.perf_counter()
                models[name](*inputs, **kwargs)
                issued = time.perf_counter()
                torch.cuda.synchronize()
                host[name].append((issued - start) * 1e3)
                synced[name].append((time.perf_counter() - start) * 1e3)
    record = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
        "host_ms_median": {n: round(statistics.median(v), 3) for n, v in host.items()},
        "host_ms_min": {n: round(min(v), 3) for n, v in host.items()},
        "synced_ms_median": {n: round(statistics.median(v), 3) for n, v in synced.items()},
        "host_over_eager_per_round_median": {n: round(statistics.median(a / b for a, b in zip(v, host["eager"])), 3) for n, v in host.items()},
    }  # fmt: skip
    args.out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
