"""Needle retrieval on CPU: content-aware block selection vs a causal window of equal block density.

    PYTHONPATH=src python benchmarks/sparse/needle.py --out benchmarks/results/sparse   # ~30 s, 1 thread

The task is :func:`attnkit.sparse.needle.needle_task` (a needle of 16 keys at a random position in
[S/8, S/2), the last block of queries asks for it; details in its docstring). For each content-aware
setting, the narrowest causal window (in whole blocks) with at least its block density is scored on
the same trials. Writes ``needle-<device>-<date>.json`` with device, torch, date and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

try:
    import attnkit  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import torch

from attnkit.sparse import ContentAware, SlidingWindow
from attnkit.sparse.needle import needle_retrieval, needle_task


def _window_of_density(density: float, seq: int, block: int) -> SlidingWindow:
    window = block
    while SlidingWindow(window).density(seq, block_size=block) < density:
        window += block
    return SlidingWindow(window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for seq in args.seq:
        task = needle_task(seq, trials=args.trials, block_size=args.block, seed=0)
        for config in (ContentAware(block_size=args.block, topk=4), ContentAware(block_size=args.block, density=0.1)):
            start = time.perf_counter()
            content = needle_retrieval(config, task)
            seconds = time.perf_counter() - start
            window = needle_retrieval(_window_of_density(content.density, seq, args.block), task)
            rows.append({"seq": seq, "content_aware": content.to_json(), "content_aware_s": seconds, "window": window.to_json()})
            print(f"S={seq:5d} {config.topk or config.density!s:>4}: content-aware density {content.density:.3f} "
                  f"acc {content.accuracy:.2f} recall {content.recall:.3f} | {window.pattern} density {window.density:.3f} "
                  f"acc {window.accuracy:.2f} recall {window.recall:.3f} | dense acc {content.dense_accuracy:.2f}")
    record = {
        "benchmark": "sparse-needle",
        "device": f"cpu ({platform.processor() or platform.machine()}, 1 thread)",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "PYTHONPATH=src python " + " ".join(sys.argv),
        "task": {"trials": args.trials, "heads": 2, "head_dim": 64, "needle_len": 16, "vocab": 64, "block": args.block,
                 "needle_position": "uniform in [S/8, S/2)", "question": "last block of queries"},
        "rows": rows,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"needle-cpu-{record['date']}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
