"""What ``auto`` should run on CPU: ``flash``, ``math`` and ``chunked`` timed forward and forward+backward.

    python benchmarks/attention/cpu_auto.py --out benchmarks/results

Minimum over ``--rounds`` of the mean of ``--calls`` calls (the minimum: other processes share the
machine and only add time); the backends take turns within each round so that load spikes hit
them alike. Writes ``<out>/attention-cpu-<date>.json`` with device, torch, date,
command, threads and one row per (shape, dtype, pass, backend) in ms; prints the winner per row.
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

from attnkit.ops import attention

# (B, H, S, D, causal): small encoder/decoder shapes around the crossover, a longer causal decoder, a long head-dim-128 sequence.
SHAPES = [(4, 8, 128, 64, False), (4, 8, 128, 64, True), (4, 8, 256, 64, False), (2, 8, 512, 64, True), (1, 8, 1024, 128, True)]
BACKENDS = ["flash", "math"]  # chunked is 2-5x slower than both on every shape (first run of this script)


def _time_ms(fns: dict, calls: int, rounds: int) -> dict[str, float]:
    """name -> ms per call, the minimum over rounds; the functions take turns within a round."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / calls * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for batch, heads, seq, dim, causal in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(batch, heads, seq, dim, dtype=dtype) for _ in range(3))
            for backward in (False, True):
                leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]

                def step(name):
                    out = attention(*leaves, causal=causal, backend=name)
                    if backward:
                        out.sum().backward()

                times = _time_ms({name: (lambda name=name: step(name)) for name in BACKENDS}, args.calls, args.rounds)
                best = min(times, key=times.get)
                label = f"B{batch} H{heads} S{seq} D{dim} causal={causal} {str(dtype)[6:]} {'fwd+bwd' if backward else 'fwd'}"
                print(f"{label:<52} " + "  ".join(f"{n} {t:8.2f}" for n, t in times.items()) + f"   -> {best}")
                rows.append({"shape": [batch, heads, seq, dim], "causal": causal, "dtype": str(dtype)[6:],
                             "pass": "fwd+bwd" if backward else "fwd", "ms": times, "fastest": best})  # fmt: skip
    record = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "calls": args.calls,
        "rounds": args.rounds,
        "unit": "ms_per_call",
        "rows": rows,
    }
    if args.out is not None:
        path = args.out / f"attention-cpu-{datetime.date.today().isoformat()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
