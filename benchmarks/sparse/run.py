"""GPU benchmark of sparse attention against the fastest dense kernel, one JSON file.

    PYTHONPATH=src python benchmarks/sparse/run.py --out $OUT --budget-s 240   # ~4-5 min on an H200
    PYTHONPATH=src python benchmarks/sparse/run.py --out /tmp/b --quick        # 8k only
    PYTHONPATH=src python benchmarks/sparse/run.py --out /tmp/b --mask-build-only --budget-s 0   # our mask builds only, <1 min

B1 H16 D128 bf16, S = 8k, 32k and 128k, forward and forward+backward (CUDA-event medians):
cuDNN SDPA dense causal, FlexAttention dense causal, and each pattern (causal window 2048,
16 packed documents, BigBird, content-aware top-k at ~0.1 block density, selection included)
on FlexAttention (its BlockMask passed in), plus the documents as one batched dense call
(``sparse.dense_pieces``, what ``sparse_attention`` runs for them on CUDA; windows as dense pieces,
timed in the 2026-11-27 H200 run, were slower at 8k and within 3% of Flex beyond, so they were
removed). Per row: ms,
speed-up vs cuDNN dense, % of ideal (ideal = cuDNN dense causal ms x block density / causal block
density).

Budget: every length gets a share of ``--budget-s`` (20/30/50% for 8k/32k/128k; time a length
leaves unused passes on), and rows run cheapest-and-most-wanted first (cuDNN, dense pieces, the
Flex patterns, content-aware, then Flex dense and BigBird), so FlexAttention's compilations (one per
pattern, length and mode, seconds each: what kept the 2026-11-27 run from reaching content-aware at
128k, its global deadline spent on the 32k compilations) cannot starve the 128k rows. After the
timings, if time is left: a forward check of FlexAttention and the dense pieces against the
gathered path, and ``create_block_mask(_compile=True)`` build times (its first call compiles, 7-28 s).
Our own mask build (a new length after warm-up, a repeated one) runs first, for every length,
before the budget's clock starts (seconds: one compilation per pattern); ``--mask-build-only``
stops there, plus create_block_mask within the budget.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

try:
    import attnkit  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import torch
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import create_block_mask

from attnkit.bench.timing import time_fn
from attnkit.ops import attention, clear_caches
from attnkit.sparse import BigBird, Causal, ContentAware, Documents, SlidingWindow, gathered_attention, select_blocks, sparse_attention
from attnkit.sparse.dense_pieces import dense_pieces_attention

BLOCK = 128
LENGTH_SHARES = {8192: 0.2, 32768: 0.3, 131072: 0.5}
"""Fraction of the budget each length may use (cumulative: unused time passes on)."""


def cases(length: int) -> list[tuple[str, object, str]]:
    """``(case, pattern, path)`` in the order they are timed; path is "flex" or "dense pieces"."""
    window, documents = SlidingWindow(2048), Documents((length // 16,) * 16)
    return [
        ("16 packed documents (dense pieces)", documents, "dense pieces"),
        ("window 2048", window, "flex"),
        ("16 packed documents", documents, "flex"),
        ("top-k density 0.2 of causal", ContentAware(block_size=BLOCK, density=0.2), "flex"),
        ("flex dense causal", Causal(), "flex"),
        ("bigbird w1024 g128 r4", BigBird(1024, num_global=128, num_random=4, block=BLOCK), "flex"),
    ]


def _run(q, k, v, pattern, path: str, length: int):
    if path == "dense pieces":
        return dense_pieces_attention(q, k, v, pattern)
    if isinstance(pattern, ContentAware):  # selection included in the timing
        return sparse_attention(q, k, v, pattern)
    # Its BlockMask (cached per pattern and length) sends even a window or documents to FlexAttention.
    return sparse_attention(q, k, v, pattern.block_mask(length, length, block_size=BLOCK, device=q.device))


def _sync_ms(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def _build_cases(length: int) -> list[tuple[str, object]]:
    """``(name, pattern)`` of the mask-build timings; the documents split ``length`` exactly (the last takes the rest)."""
    return [("window 2048", SlidingWindow(2048)), ("16 packed documents", Documents((length // 16,) * 15 + (length - 15 * (length // 16),)))]


def build_times(length: int) -> dict:
    """Our mask construction: a new shape after warm-up (the first call compiles the build graph on
    CUDA; nothing is cached for the shorter lengths timed) and a repeated shape (the cache)."""
    result = {}
    for index, (name, pattern) in enumerate(_build_cases(length)):
        clear_caches()
        pattern.block_mask(length, length, block_size=BLOCK, device="cuda")  # warm-up: compilation, first kernels
        graphs, new = counters["stats"]["unique_graphs"], []
        for step in range(1, 6):  # a new sequence length each time: nothing cached
            shorter = length - step * BLOCK
            _, shaped = _build_cases(shorter)[index]  # the same pattern at the new length
            new.append(_sync_ms(lambda: shaped.block_mask(shorter, shorter, block_size=BLOCK, device="cuda")))
        repeated = [_sync_ms(lambda: pattern.block_mask(length, length, block_size=BLOCK, device="cuda")) for _ in range(20)]
        result[name] = {
            "ours_new_shape_ms": statistics.median(new),
            "ours_new_shape_all_ms": new,
            "ours_new_shape_compilations": counters["stats"]["unique_graphs"] - graphs,
            "ours_repeated_ms": statistics.median(repeated),
        }
    return result


def create_block_mask_times(length: int) -> dict:
    """torch's construction from the elements, ``create_block_mask(_compile=True)``: first call (compiles, 7-28 s) and steady state."""
    result = {}
    for name, pattern in _build_cases(length):
        mask_mod = pattern.mask_mod(length, length, "cuda")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            build = lambda: create_block_mask(mask_mod, None, None, length, length, device="cuda", BLOCK_SIZE=BLOCK, _compile=True)  # noqa: E731
            first = _sync_ms(build)
            steady = [_sync_ms(build) for _ in range(5)]
        result[name] = {"create_block_mask_compile_first_ms": first, "create_block_mask_compile_ms": statistics.median(steady)}
    return result


def measure(length: int, repeats: int, deadline: float) -> dict:
    q, k, v = (torch.randn(1, 16, length, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    causal_density = Causal().density(length, block_size=BLOCK)
    rows = []

    def timed(fn, backward: bool):
        if time.perf_counter() > deadline:
            return None
        if backward:
            call = lambda: torch.autograd.grad(fn(), (q, k, v), grad)  # noqa: E731
        else:
            def call():
                with torch.no_grad():
                    fn()
        return time_fn(call, warmup=3, repeats=repeats, device="cuda").median_ms

    dense = {mode: timed(lambda: attention(q, k, v, causal=True, backend="cudnn"), mode == "fwd+bwd") for mode in ("fwd", "fwd+bwd")}
    rows.append({"case": "cuDNN SDPA dense causal", "path": "cudnn", "block_density": causal_density, **{f"{m}_ms": t for m, t in dense.items()}})
    print(json.dumps(rows[-1]), flush=True)
    for name, pattern, path in cases(length):
        if time.perf_counter() > deadline:
            rows.append({"case": name, "path": path, "pattern": repr(pattern), "skipped": "budget spent"})
            continue
        if isinstance(pattern, ContentAware):
            density = select_blocks(q.detach(), k.detach(), pattern).density
        else:
            density = pattern.density(length, block_size=BLOCK)
        row = {"case": name, "path": path, "pattern": repr(pattern), "block_density": density}
        for mode in ("fwd", "fwd+bwd"):
            ms = timed(lambda: _run(q, k, v, pattern, path, length), mode == "fwd+bwd")
            row[f"{mode}_ms"] = ms
            if ms is not None and dense[mode] is not None:
                ideal = dense[mode] * density / causal_density
                row[f"{mode}_speedup_vs_cudnn"] = dense[mode] / ms
                row[f"{mode}_pct_of_ideal"] = 100 * ideal / ms
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"seq_len": length, "rows": rows}


def check(length: int = 4096) -> dict:
    """Forward max |path - gathered| on the same pattern (float32)."""
    q, k, v = (torch.randn(1, 4, length, 64, device="cuda") for _ in range(3))
    errors = {}
    for name, pattern, path in cases(length):
        if isinstance(pattern, ContentAware):
            continue
        block_mask = pattern.block_mask(length, length, block_size=BLOCK, device="cuda")
        got = _run(q, k, v, pattern, path, length)
        gathered, _ = gathered_attention(q, k, v, block_mask, scale=64**-0.5)
        errors[name] = float((got - gathered).abs().max())
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON file")
    parser.add_argument("--quick", action="store_true", help="S = 8k only")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=240.0, help="skip timings that would start after this (shared out per length)")
    parser.add_argument("--mask-build-only", action="store_true", help="only the mask builds: ours, then create_block_mask within --budget-s")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    config = torch._dynamo.config  # one compiled FlexAttention per (mask, length, grad mode): more than the default 8
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))
    lengths = [8192] if args.quick else list(LENGTH_SHARES)
    shares = [LENGTH_SHARES[n] for n in lengths]
    report = {
        "schema": 1,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "PYTHONPATH=src python " + " ".join(sys.argv),
        "shape": {"batch": 1, "heads": 16, "head_dim": 128, "dtype": "bfloat16", "block_size": BLOCK},
        "ideal": "cuDNN dense causal ms x block_density / causal block_density",
        "budget_s": args.budget_s,
        "length_shares": dict(zip(map(str, lengths), shares)),
        "results": [],
        "mask_build": {},
    }
    for length in lengths:  # ours first, outside the budget: seconds in all (one compilation per pattern)
        report["mask_build"][str(length)] = build_times(length)
        print(json.dumps({"seq_len": length, "mask_build": report["mask_build"][str(length)]}), flush=True)
    start = time.perf_counter()
    if not args.mask_build_only:
        for index, length in enumerate(lengths):
            deadline = start + args.budget_s * sum(shares[: index + 1]) / sum(shares)
            report["results"].append(measure(length, args.repeats, deadline))
            clear_caches()  # drop this length's block masks before the next, larger one
            torch.cuda.empty_cache()
    end = start + args.budget_s
    if not args.mask_build_only and time.perf_counter() < end:
        report["check_vs_gathered_max_abs"] = check()
    for length in lengths:
        if time.perf_counter() < end:
            report["mask_build"][str(length)].update(create_block_mask_times(length))
            print(json.dumps({"seq_len": length, "mask_build": report["mask_build"][str(length)]}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = report["device"].lower().replace(" ", "-")
    path = args.out / f"sparse-{name}-{report['date']}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
