"""Eager time of ``attnkit.nn.MultiHeadAttention`` against ``torch.nn.MultiheadAttention`` at small shapes.

    python benchmarks/attention/mha_overhead.py --out "$OUT"                 # on the GPU machine (~1 min on an H100)
    python benchmarks/attention/mha_overhead.py --device cpu --quick         # smoke test
    python benchmarks/attention/mha_overhead.py --device cpu --tiny --rounds 15 --repeats 200   # host overhead

The goal (issue 9): attnkit's layer within 10% of torch's eager time at small shapes, where per-call
host work (checks, mask handling, dispatch) shows. Both layers hold the same weights (``from_torch``),
take ``(B, S, E)`` (``batch_first=True``, the layout of torch's fused inference path) and run
self-attention with ``need_weights=False``. Four passes per shape and dtype:

* ``forward``: training mode (dropout 0), autograd recording;
* ``forward+backward``: the same plus ``backward`` of a fixed upstream gradient;
* ``inference``: eval mode under ``torch.inference_mode()``, where torch's layer takes its fused
  fast path (``torch._native_multi_head_attention``) and so does attnkit's (``attnkit.nn.fast_path``);
* ``inference+padding``: the same with a bool ``key_padding_mask`` (the last quarter of batch
  element 0's keys padded), still on both fused paths.

No mask except in ``inference+padding``. ``--tiny`` runs one tiny shape (B=2, S=16, E=64, 4 heads)
where compute is negligible, so the times are host overhead (run it with ``--device cpu``).

Timing is :func:`attnkit.bench.race`: the two layers take turns in interleaved rounds (CUDA events
per call, median of each round; the ratio is taken within a round so clock drift cancels). Reported
per row: both medians in ms and ``ratio`` = attnkit / torch (the median of the per-round ratios;
> 1 = attnkit slower). Writes ``<out>/mha-overhead-<device>-<date>.json`` with ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

try:
    import attnkit  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import torch
from _results import header, write
from torch import nn

from attnkit.bench import race
from attnkit.nn import from_torch

# (B, S, E, H): head dim 64 throughout (E 256 / 4 heads, E 768 / 12 heads: BERT-base).
SHAPES = [(b, s, e, h) for b, s, (e, h) in itertools.product((1, 8), (64, 128, 512), ((256, 4), (768, 12)))]
QUICK_SHAPES = [(1, 64, 256, 4), (8, 128, 768, 12)]
TINY_SHAPES = [(2, 16, 64, 4)]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
PASSES = ("forward", "forward+backward", "inference", "inference+padding")


def _layers(embed_dim: int, heads: int, device: torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(embed_dim, heads, dropout=0.0, batch_first=True, device=device, dtype=dtype)
    return {"torch": reference, "attnkit": from_torch(reference)}


def _step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, padding: torch.Tensor, pass_: str):
    """One zero-argument call of ``pass_`` on ``layer``."""
    if pass_.startswith("inference"):
        kwargs = {"key_padding_mask": padding} if pass_ == "inference+padding" else {}

        def infer():
            with torch.inference_mode():
                return layer(x, x, x, need_weights=False, **kwargs)[0]

        return infer
    if pass_ == "forward":
        return lambda: layer(x, x, x, need_weights=False)[0]

    def train():
        layer(x, x, x, need_weights=False)[0].backward(grad)

    return train


def measure_row(shape, dtype: torch.dtype, pass_: str, device: torch.device, *, rounds: int, repeats: int, warmup: int) -> dict:
    batch, seq, embed_dim, heads = shape
    layers = _layers(embed_dim, heads, device, dtype)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, seq, embed_dim, generator=generator).to(device=device, dtype=dtype)
    grad = torch.randn(batch, seq, embed_dim, generator=generator).to(device=device, dtype=dtype)
    padding = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    padding[0, seq - seq // 4 :] = True
    fns = {}
    for name, layer in layers.items():
        layer.train(not pass_.startswith("inference"))
        fns[name] = _step(layer, x.requires_grad_(pass_ == "forward+backward"), grad, padding, pass_)
        fns[name]()  # first call: lazy init, auto's choice, allocator
    entries = race(fns, baseline="torch", rounds=rounds, repeats=repeats, warmup=warmup, device=device)
    ours, base = entries["attnkit"], entries["torch"]
    row = {"batch": batch, "seq": seq, "embed_dim": embed_dim, "heads": heads, "dtype": str(dtype).removeprefix("torch."), "pass": pass_}
    if ours.error:
        return {**row, "error": ours.error}
    ratio = statistics.median(1.0 / r for r in ours.ratios)  # attnkit / torch within each round
    return {**row, "torch_ms": round(base.median_ms, 5), "attnkit_ms": round(ours.median_ms, 5), "ratio": round(ratio, 3),
            "ratio_range": [round(1.0 / max(ours.ratios), 3), round(1.0 / min(ours.ratios), 3)]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="two shapes, float32 only, fewer rounds (smoke test)")
    parser.add_argument("--tiny", action="store_true", help="one tiny shape (2, 16, 64, 4 heads): host overhead only")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per round (default 25, quick 3)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON record (e.g. $OUT)")
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = TINY_SHAPES if args.tiny else QUICK_SHAPES if args.quick else SHAPES
    dtypes = {"float32": torch.float32} if args.quick or device.type == "cpu" else DTYPES
    rounds = args.rounds or (2 if args.quick else 7)
    repeats = args.repeats or (3 if args.quick else 25)
    record = {
        **header(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "baseline": "torch.nn.MultiheadAttention (same weights, batch_first=True, need_weights=False)",
        "timing": f"attnkit.bench.race: {rounds} interleaved rounds x {repeats} calls, median per round; ratio = median of per-round attnkit/torch",
        "goal": "ratio <= 1.10 at small shapes (issue 9)",
        "rows": [],
    }
    start = time.perf_counter()
    print(f"{'B':>2} {'S':>4} {'E':>4} {'H':>3} {'dtype':>8} {'pass':>17} {'torch ms':>9} {'attnkit ms':>10} {'ratio':>6}")
    for shape, (dtype_name, dtype), pass_ in itertools.product(shapes, dtypes.items(), PASSES):
        row = measure_row(shape, dtype, pass_, device, rounds=rounds, repeats=repeats, warmup=3 if not args.quick else 1)
        record["rows"].append(row)
        if "error" in row:
            print(f"{shape[0]:>2} {shape[1]:>4} {shape[2]:>4} {shape[3]:>3} {dtype_name:>8} {pass_:>17}  error: {row['error']}")
            continue
        flag = "" if row["ratio"] <= 1.10 else "  > 1.10"
        print(f"{shape[0]:>2} {shape[1]:>4} {shape[2]:>4} {shape[3]:>3} {dtype_name:>8} {pass_:>17} "
              f"{row['torch_ms']:9.4f} {row['attnkit_ms']:10.4f} {row['ratio']:6.3f}{flag}")  # fmt: skip
    ratios = [row["ratio"] for row in record["rows"] if "ratio" in row]
    record["summary"] = {
        "rows": len(record["rows"]), "within_10_percent": sum(r <= 1.10 for r in ratios),
        "median_ratio": round(statistics.median(ratios), 3) if ratios else None, "worst_ratio": max(ratios, default=None),
        "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    print(f"{record['summary']['within_10_percent']}/{len(ratios)} rows within 10%, median ratio {record['summary']['median_ratio']}, "
          f"worst {record['summary']['worst_ratio']} ({record['summary']['seconds']} s)")  # fmt: skip
    write(record, args.out, "mha-overhead")


if __name__ == "__main__":
    main()
