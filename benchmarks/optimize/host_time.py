"""Where a rewrite's host time goes: eager vs the attention-interface switch vs projection fusion vs both.

A batch-64 BERT-128 forward on an H200 is host-bound (about 3.5 ms of kernels in a longer step), so
every microsecond of Python per layer shows. Per zoo model, four variants of one inference forward
(bf16, ``inference_mode``):

- ``eager``: the model as built;
- ``rewrite``: ``optimize``'s rewrite (attention interface + fused projections);
- ``interface only``: ``fuse_qkv=False``;
- ``fusion only``: ``rewrite_hf=False``.

Measured: host milliseconds per forward at batch 1 (wall time of ``--calls`` forwards issued back to
back, one sync at the end: the GPU finishes each forward long before the host issues the next, so
wall time is host time; best of ``--rounds`` interleaved rounds), the batch-64 race against eager
(``attnkit.bench.race``), a ``cProfile`` of the rewrite at batch 1 (the functions with the most own
time, in microseconds per forward), and for the first layer's attention module the host microseconds
per call of each piece: the module itself in every variant, its three projections, and the attention
core (``F.scaled_dot_product_attention``, the ATen kernels, ``attnkit.ops.attention``, transformers'
``sdpa_attention_forward`` and attnkit's interface function) on contiguous and on fused (strided) q/k/v.

    PYTHONPATH=src python benchmarks/optimize/host_time.py --out $OUT
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import json
import pstats
import re
import sys
import time
from pathlib import Path

import torch

from attnkit.bench import kernel_stats, race
from attnkit.models import build_model
from attnkit.optimize import OptimizeConfig, optimize

from run import CASES, _inference_fn, _slice  # benchmarks/optimize/run.py: the grid's models and helpers

MODELS = {label: CASES[label] for label in ("bert-base-128", "llama-gqa-1024")}
VARIANTS = {"rewrite": {}, "interface only": {"fuse_qkv": False}, "fusion only": {"rewrite_hf": False}}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def host_ms(fns: dict, calls: int, rounds: int, device: str) -> dict[str, float]:
    """Best-of-rounds wall milliseconds per call, ``calls`` calls per round, one sync per round.

    Not ``attnkit.bench.host_ms``, which times one call after a sync (an idle GPU every time): this
    times calls issued back to back, as a serving loop issues them.
    """
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            _sync(device)
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            _sync(device)
            best[name] = min(best[name], (time.perf_counter() - started) / calls * 1e3)
    return {name: round(ms, 4) for name, ms in best.items()}


def own_time_us(fn, calls: int, device: str, top: int = 25) -> list[dict]:
    """cProfile of ``calls`` calls: the ``top`` functions by own time, microseconds per call."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    _sync(device)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    return [{"function": f"{re.sub(r'.*(site-packages|src)/', '', path)}:{line}({name})",
             "calls_per_forward": round(nc / calls, 1), "own_us": round(tt / calls * 1e6, 1), "cum_us": round(ct / calls * 1e6, 1)}
            for (path, line, name), (_, nc, tt, ct, _) in rows]


def _host_us(fns: dict, args: argparse.Namespace, calls: int = 200) -> dict[str, float]:
    """Host microseconds per call of each zero-argument function (best of rounds; see :func:`host_ms`)."""
    with torch.inference_mode():
        return {name: round(ms * 1e3, 2) for name, ms in host_ms(fns, calls, args.rounds, args.device).items()}


def components(modules: dict, hidden: torch.Tensor, args: argparse.Namespace) -> dict:
    """Host µs per call of the first layer's attention module and of its pieces (see the module docstring)."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from attnkit.ops import attention
    from attnkit.optimize.hf_interface import attnkit_attention_forward

    first = {variant: next(m for m in model.modules() if type(m).__name__.endswith("SelfAttention") or
                           type(m).__name__.endswith("Attention") and hasattr(m, "config"))
             for variant, model in modules.items()}
    eager, fused = first["eager"], first["rewrite"]
    names = [n for n, c in eager.named_children() if isinstance(c, torch.nn.Linear)][:3]
    b, s, _ = hidden.shape
    heads = [getattr(eager, a) for a in ("num_attention_heads", "num_heads") if hasattr(eager, a)]
    heads = heads[0] if heads else eager.config.num_attention_heads

    def qkv(module):
        return [getattr(module, n)(hidden).view(b, s, heads, -1).transpose(1, 2) for n in names]

    with torch.inference_mode():
        contiguous = [t.contiguous() for t in qkv(eager)]
        strided = qkv(fused)
    fns = {f"module: {variant}": (lambda m=m: m(hidden)) for variant, m in first.items()}
    layers = {variant: next((m for m in model.modules() if type(m).__name__.endswith("Layer")), None) for variant, model in modules.items()}
    fns.update({f"layer: {variant}": (lambda m=m: m(hidden)) for variant, m in layers.items() if m is not None})
    fns["projections: 3 nn.Linear"] = lambda: qkv(eager)
    fns["projections: fused members"] = lambda: qkv(fused)
    for layout, (q, k, v) in (("contiguous", contiguous), ("strided", strided)):
        fns[f"F.sdpa {layout}"] = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)
        fns[f"attnkit.ops.attention {layout}"] = lambda q=q, k=k, v=v: attention(q, k, v)
        if hidden.is_cuda:
            fns[f"aten cudnn {layout}"] = lambda q=q, k=k, v=v: torch._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, False, False)
            fns[f"aten flash {layout}"] = lambda q=q, k=k, v=v: torch._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)
        fns[f"transformers sdpa_attention_forward {layout}"] = lambda q=q, k=k, v=v: sdpa_attention_forward(fused, q, k, v, None, dropout=0.0, scaling=None)
        fns[f"attnkit interface {layout}"] = lambda q=q, k=k, v=v: attnkit_attention_forward(fused, q, k, v, None, dropout=0.0, scaling=None)
    return _host_us(fns, args)


def measure(label: str, args: argparse.Namespace) -> dict:
    name, seq = MODELS[label]
    zoo = build_model(name, batch_size=args.batch, seq_len=seq, dtype=torch.bfloat16, device=args.device)
    model, inputs, kwargs = zoo.model.eval(), zoo.example_inputs, zoo.example_kwargs
    one, one_kwargs = _slice(inputs, 1), _slice(kwargs, 1)
    modules = {"eager": model}
    for variant, overrides in VARIANTS.items():
        config = OptimizeConfig(dtype=torch.bfloat16, measure=False, **overrides)
        modules[variant], report = optimize(model, one, example_kwargs=one_kwargs, config=config)
        assert report.passed, f"{label} {variant}: {report!r}"
    batch1 = {v: _inference_fn(m, one, one_kwargs) for v, m in modules.items()}
    batch64 = {v: _inference_fn(m, inputs, kwargs) for v, m in modules.items()}
    entries = race(batch64, baseline="eager", rounds=args.rounds, repeats=args.repeats, warmup=2, device=args.device)
    hidden = torch.randn(1, seq, model.config.hidden_size, device=args.device, dtype=torch.bfloat16)
    try:
        parts = components(modules, hidden, args)
    except Exception as error:  # noqa: BLE001 - a module that needs more than hidden states (rotary inputs)
        parts = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
    kernels = {}
    if args.device.startswith("cuda"):
        for variant, fn in batch1.items():
            count, groups = kernel_stats(fn, iters=3)
            kernels[variant] = {"kernels": count, "device_ms": round(sum(groups.values()), 4)}
    return {
        "components_host_us_batch1": parts,
        "kernels_batch1": kernels,
        "host_ms_batch1": host_ms(batch1, args.calls, args.rounds, args.device),
        f"race_batch{args.batch}": {v: {"median_ms": round(e.median_ms, 4), "speedup": round(e.speedup, 3),
                                        "ratios": [round(r, 3) for r in e.ratios]} for v, e in entries.items()},
        "rewrite_own_time_batch1": own_time_us(batch1["rewrite"], args.calls, args.device),
        "eager_own_time_batch1": own_time_us(batch1["eager"], args.calls, args.device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {list(MODELS)}")
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    record = {"device": device_name, "torch": torch.__version__, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "models": {}}
    import transformers

    record["transformers"] = transformers.__version__
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    path = args.out / f"optimize-host-time-{slug}-{dt.date.today().isoformat()}.json"
    for label in args.models.split(","):
        record["models"][label] = measure(label, args)
        path.write_text(json.dumps(record, indent=1))
        print(label, json.dumps({k: v for k, v in record["models"][label].items() if "own_time" not in k}), flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
