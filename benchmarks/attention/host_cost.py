"""Host cost against GPU time of each CUDA attention kernel per call, at the small shapes where the host decides.

A kernel that takes a few microseconds on the GPU finishes before the host has issued the next call,
so what such a call costs is the host's time to issue it. Per shape (bf16, inference, no mask) and per
kernel (each ATen op called directly, ``F.scaled_dot_product_attention`` and ``attnkit.ops.attention``
with ``auto``; with ``--fused`` also on q/k/v that are views of one fused Q/K/V output), two numbers
in µs per call, over rounds in which the kernels take turns:

* host: ``attnkit.bench.host_ms``, the host time to issue one call after a synchronize (median of
  ``--calls``; the minimum over rounds: other processes only ever add time);
* device: ``attnkit.bench.device_ms``, the GPU time of one call queued behind a sleeping kernel
  (median of ``--calls``, then over rounds).

``--bert`` also races (``attnkit.bench.race``) BERT-base (seq 128) eager against ``optimize``'s rewrite
with its attention on ``auto`` and forced to ``flash`` / ``efficient``, at batch 1 and 64. The ``auto``
rule for small calls comes from this run. (The session-7 file was written by this script's first
version, which timed with loops of its own: host as the mean over back-to-back calls, device with events
around all of them, BERT with a sync after each forward; the same quantities. Session 8's
``attention-host-...-session8-fused.json`` comes from this version, with ``--fused``.)

    PYTHONPATH=src python benchmarks/attention/host_cost.py --bert --out "$OUT"
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

try:
    import attnkit  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import torch
import torch.nn.functional as F
from _results import header, write

from attnkit.bench import device_ms, host_ms, race
from attnkit.ops import attention

SHAPES = ((1, 12, 128, 64), (8, 12, 128, 64), (16, 12, 128, 64), (64, 12, 128, 64), (1, 12, 197, 64), (8, 12, 256, 64), (64, 12, 512, 64))
"""(B, H, S, D): BERT-128 at batch 1/8/16/64, ViT-B/16 at batch 1, S256 at batch 8, BERT-512 at batch 64."""


def kernels(q, k, v) -> dict:
    """Each way to run one non-causal, unmasked call: ``{name: fn}``."""
    return {
        "cudnn": lambda: torch._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, False, False)[0],
        "flash": lambda: torch._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[0],
        "efficient": lambda: torch._scaled_dot_product_efficient_attention(q, k, v, None, False, 0.0, False)[0],
        "F.sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "attention auto": lambda: attention(q, k, v),
    }


def inputs(shape: tuple, fused: bool) -> tuple:
    """q, k, v of ``shape`` (B, H, S, D): contiguous, or (``fused``) views of one ``(B, S, 3*H*D)``
    projection output, the layout a fused Q/K/V GEMM hands to the attention (strides ``(S*3*H*D, D, 3*H*D, 1)``)."""
    if not fused:
        return tuple(torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    batch, heads, seq, dim = shape
    qkv = torch.randn(batch, seq, 3 * heads * dim, device="cuda", dtype=torch.bfloat16)
    return tuple(part.view(batch, seq, heads, dim).transpose(1, 2) for part in qkv.split(heads * dim, dim=-1))


def per_kernel(args) -> dict:
    rows = {}
    for shape, fused in [(shape, False) for shape in SHAPES] + [(shape, True) for shape in SHAPES if args.fused]:
        q, k, v = inputs(shape, fused)
        fns = kernels(q, k, v)
        host, device = {n: [] for n in fns}, {n: [] for n in fns}
        for r in range(args.rounds):
            for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
                for _ in range(10):
                    fns[name]()
                host[name].append(host_ms(fns[name], repeats=args.calls) * 1e3)
                device[name].append(device_ms(fns[name], repeats=args.calls) * 1e3)
        name = str(shape) + (" fused qkv" if fused else "")
        rows[name] = {n: {"host_us": round(min(host[n]), 2), "device_us": round(statistics.median(device[n]), 2)} for n in fns}
        print(name, {n: (r["host_us"], r["device_us"]) for n, r in rows[name].items()}, flush=True)
    return rows


def bert(args) -> dict:
    """BERT-128 forwards (ms): eager, and the rewrite with its attention on each backend."""
    from attnkit.models import build_model
    from attnkit.optimize import OptimizeConfig, optimize

    zoo = build_model("bert-base", batch_size=64, seq_len=128, dtype=torch.bfloat16, device="cuda")
    model, inputs, kwargs = zoo.model.eval(), zoo.example_inputs, zoo.example_kwargs
    first = lambda value, n: value[:n] if isinstance(value, torch.Tensor) else value  # noqa: E731
    rewrites = {
        backend: optimize(model, tuple(first(x, 1) for x in inputs), example_kwargs={k: first(v, 1) for k, v in kwargs.items()},
                          config=OptimizeConfig(dtype=torch.bfloat16, check=False, measure=False, backend=backend))[0]
        for backend in ("auto", "flash", "efficient")
    }  # fmt: skip
    results = {}
    for batch in (1, 64):
        ins, kws = tuple(first(x, batch) for x in inputs), {k: first(v, batch) for k, v in kwargs.items()}
        fns = {"eager": lambda: model(*ins, **kws)} | {f"rewrite {b}": (lambda m=m: m(*ins, **kws)) for b, m in rewrites.items()}
        entries = race(fns, baseline="eager", rounds=args.rounds, repeats=20, warmup=3)
        results[f"batch {batch}"] = {name: entry.to_json() for name, entry in entries.items()}
        print(f"bert-128 batch {batch}:", {name: (entry.median_ms, entry.speedup) for name, entry in entries.items()}, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per timing (>= 1)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds in which the contenders take turns (>= 1)")
    parser.add_argument("--bert", action="store_true", help="also race BERT-128 with its attention on each backend")
    parser.add_argument("--fused", action="store_true", help="also time each shape on q/k/v views of one fused projection output")
    parser.add_argument("--out", type=Path, help="folder for the JSON record (attention-host-<device>-<date>.json)")
    args = parser.parse_args()
    if args.calls < 1 or args.rounds < 1:
        parser.error(f"--calls and --rounds must be >= 1, got {args.calls} and {args.rounds}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device: the host cost of a CUDA kernel's call is what it measures")
    record = header(torch.cuda.get_device_name()) | {"dtype": "bf16", "calls": args.calls, "rounds": args.rounds}
    with torch.inference_mode():  # optimize builds normal parameters inside it too
        record["kernels"] = per_kernel(args)
        if args.bert:
            record["bert_128"] = bert(args)
    write(record, args.out, "attention-host")


if __name__ == "__main__":
    main()
