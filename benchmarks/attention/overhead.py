"""Per-call overhead of ``attnkit.ops.attention()`` against a direct SDPA call, in µs per call.

    python benchmarks/attention/overhead.py                       # host side, tiny tensors
    python benchmarks/attention/overhead.py --out benchmarks/results   # also write the JSON record
    python benchmarks/attention/overhead.py --out "$OUT"               # on the GPU machine

The goal (issue 9): ``attention()`` (auto) at most 1.15x a direct SDPA call at B8 H12 S512 D64 bf16;
the run prints ``ratio`` = attention auto / sdpa (direct) for each measurement and stores it.

Two measurements, each the minimum over ``--rounds`` rounds of ``--calls`` back-to-back calls
(the minimum, because other processes share the machine and only ever add time):

* host: ``perf_counter`` around the loop on tiny ``(1, 2, 8, 16)`` float32 tensors, so the
  time is almost all Python and dispatch (on CUDA, ended by a synchronize; tiny kernels
  finish long before the host issues the next one);
* cuda (only on a GPU): CUDA events around the loop at ``B8 H12 S512 D64`` bf16, the shape
  where attnkit's overhead used to exceed the kernel (SDPA 0.047 ms vs cuDNN through
  ``attention()`` 0.16 ms on an H100, torch 2.11).

Rows: direct ``F.scaled_dot_product_attention``; the same under ``sdpa_kernel`` forcing one
kernel (what a forced backend runs); ``attention()`` with ``auto`` and forced backends.
Writes ``<out>/attention-overhead-<device>-<date>.json`` with ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

try:
    import attnkit  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import torch
import torch.nn.functional as F
from _results import header, write
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkit.ops import attention

_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}


def _loop_us(fn: Callable[[], object], *, calls: int, rounds: int, device: torch.device, events: bool) -> float:
    """Minimum over ``rounds`` of the mean time per call of ``calls`` back-to-back calls, in µs."""
    for _ in range(max(10, calls // 10)):  # warm-up: allocator, lazy init, caches
        fn()
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            elapsed_s = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            for _ in range(calls):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed_s = time.perf_counter() - begin
        best = min(best, elapsed_s / calls * 1e6)
    return best


def _cases(q, k, v, backends: list[str]) -> dict[str, Callable[[], object]]:
    cases: dict[str, Callable[[], object]] = {"sdpa (direct)": lambda: F.scaled_dot_product_attention(q, k, v)}
    for name in backends:
        if name in _KERNELS:

            def forced(kernel=_KERNELS[name]):
                with sdpa_kernel(kernel):
                    return F.scaled_dot_product_attention(q, k, v)

            cases[f"sdpa_kernel({name})"] = forced
    cases["attention auto"] = lambda: attention(q, k, v)
    cases["attention auto causal"] = lambda: attention(q, k, v, causal=True)
    for name in backends:
        cases[f"attention {name}"] = lambda name=name: attention(q, k, v, backend=name)
    return cases


def measure(device: torch.device, *, shape, dtype, backends: list[str], calls: int, rounds: int, events: bool) -> dict[str, float]:
    """µs per call for every case that runs here (a case that raises is reported and left out)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=generator).to(device=device, dtype=dtype) for _ in range(3))
    results = {}
    for label, fn in _cases(q, k, v, backends).items():
        try:
            fn()
        except Exception as error:  # a backend this device/torch cannot run: say so, keep going
            print(f"  {label:<26} skipped: {type(error).__name__}: {str(error)[:100]}")
            continue
        results[label] = _loop_us(fn, calls=calls, rounds=rounds, device=device, events=events)
        print(f"  {label:<26} {results[label]:9.2f} µs/call")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=2000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the minimum is reported")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON record (e.g. $OUT)")
    args = parser.parse_args()
    device = torch.device(args.device)
    backends = ["flash", "math"] if device.type == "cpu" else ["cudnn", "flash", "efficient", "math"]
    record = {
        **header(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "calls": args.calls,
        "rounds": args.rounds,
        "unit": "us_per_call",
    }
    print(f"host: (1, 2, 8, 16) float32 on {device}, perf_counter, min of {args.rounds} x {args.calls} calls")
    record["host"] = {
        "shape": [1, 2, 8, 16],
        "dtype": "float32",
        "us_per_call": measure(device, shape=(1, 2, 8, 16), dtype=torch.float32, backends=backends, calls=args.calls, rounds=args.rounds, events=False),
    }
    if device.type == "cuda":
        shape = (8, 12, 512, 64)
        print(f"cuda: {shape} bfloat16, CUDA events, min of {args.rounds} x {args.calls // 4} calls")
        record["cuda"] = {
            "shape": list(shape),
            "dtype": "bfloat16",
            "us_per_call": measure(device, shape=shape, dtype=torch.bfloat16, backends=backends, calls=args.calls // 4, rounds=args.rounds, events=True),
        }
    for part in ("host", "cuda"):
        if part in record:
            times = record[part]["us_per_call"]
            if "attention auto" in times and "sdpa (direct)" in times:
                ratio = times["attention auto"] / times["sdpa (direct)"]
                record[part]["ratio_auto_vs_sdpa"] = round(ratio, 3)
                goal = "  (goal <= 1.15)" if part == "cuda" else ""
                print(f"{part}: attention auto / sdpa direct = {ratio:.3f}{goal}")
    write(record, args.out, "attention-overhead")


if __name__ == "__main__":
    main()
