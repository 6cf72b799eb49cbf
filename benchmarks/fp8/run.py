"""FP8 training speed on a GPU: bf16 vs attnkit's recipes (vs torchao when importable), fwd+bwd.

    PYTHONPATH=src python benchmarks/fp8/run.py --probe --table --out $OUT     # layouts + auto-filter table
    PYTHONPATH=src python benchmarks/fp8/run.py --anchors --out $OUT           # issue 12's anchor table
    PYTHONPATH=src python benchmarks/fp8/run.py --eager --out $OUT             # the block without torch.compile
    PYTHONPATH=src python benchmarks/fp8/run.py --gap --out $OUT               # tensorwise vs torchao, raced + kernels

``--probe``: which ``_scaled_mm`` scalings and layouts this GPU/torch runs (blockwise included).
``--table``: speed-up grid for ``attnkit.fp8.auto_filter`` (copy ``fp8-table-*.json`` to
``src/attnkit/fp8/speedup_table.json``). ``--anchors``: the issue's linear shapes (one
``torch.compile(dynamic=True)`` graph per variant serves all of them) and the Llama-style block
(static compile, plus eager bf16/tensorwise); there every variant is compiled. ``--eager``: the
Llama-style block without ``torch.compile``: bf16, each recipe (fused Triton casts where triton imports),
tensorwise and rowwise again on the torch casts, torchao's recipes when importable. Times are medians of
CUDA events around one fwd+bwd each. One JSON record per mode: device, torch, date, command, shapes, ms,
TFLOP/s (GEMM FLOPs: 6 M K N per linear), speed-ups over bf16 measured in the same run.
``--gap``: the anchor shapes once more, each compiled statically (one graph per shape), with bf16,
attnkit tensorwise and torchao tensorwise raced in interleaved rounds (``attnkit.bench.race``: paired
ratios, so clock drift cancels), and each variant's CUDA kernels by name at every shape: where the
time of one fwd+bwd goes, GEMMs against casts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import re
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

try:
    import attnkit  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import torch
import torch.nn.functional as F
from torch import nn

import attnkit.fp8.linear
from attnkit.bench import kernel_stats, race, time_fn
from attnkit.fp8 import (Float8TrainingConfig, Granularity, conversion_plan, convert_to_float8_training,
                         native_blockwise_support, quantize, scaled_gemm)

RECIPES = ["tensorwise", "rowwise", "rowwise_with_gw_hp", "blockwise", "delayed"]
ANCHORS = [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 8192, 8192), (16384, 8192, 28672)]
GRID = {"M": [4096, 16384], "K": [1024, 2048, 4096, 8192], "N": [1024, 2048, 4096, 8192]}


# ---------------------------------------------------------------------------- variants
def _torchao():
    try:
        from torchao.float8 import Float8LinearConfig
        from torchao.float8 import convert_to_float8_training as ao_convert
        import torchao
        return torchao.__version__, Float8LinearConfig, ao_convert
    except Exception as err:  # noqa: BLE001 - any import failure means "no peer"
        return f"unavailable: {type(err).__name__}: {err}", None, None


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception as err:  # noqa: BLE001 - no triton: Float8Linear runs the torch casts in eager mode
        return f"unavailable: {type(err).__name__}: {err}"


def _variants(tokens: int, with_torchao: bool) -> dict:
    """name -> function(bf16 module) -> module to benchmark (converted in place on a deep copy)."""
    out = {"bf16": lambda m: m}
    native_block = native_blockwise_support("cuda") is None
    for recipe in RECIPES:
        if recipe == "blockwise" and not native_block:
            continue
        config = Float8TrainingConfig.from_recipe_name(recipe)
        out[f"attnkit:{recipe}"] = lambda m, c=config: convert_to_float8_training(m, config=c)
    auto = Float8TrainingConfig(auto_filter=True, auto_filter_tokens=tokens)
    out["attnkit:tensorwise+auto"] = lambda m: convert_to_float8_training(m, config=auto)
    version, ao_config, ao_convert = _torchao()
    if with_torchao and ao_convert is not None:
        for recipe in ("tensorwise", "rowwise"):
            out[f"torchao:{recipe}"] = lambda m, r=recipe: ao_convert(m, config=ao_config.from_recipe_name(r))
    return out


# ---------------------------------------------------------------------------- timing
def _median_ms(step, warmup: int, reps: int) -> float:
    """Median CUDA-event ms of ``step`` (the project's one timer, ``attnkit.bench.time_fn``)."""
    return time_fn(step, warmup=warmup, repeats=reps, device="cuda").median_ms


def _fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    params = list(module.parameters())

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        module(x).backward(grad)
    return step


def _linear_case(m: int, k: int, n: int):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    return x, grad


# ---------------------------------------------------------------------------- llama block
class _LlamaBlock(nn.Module):
    """RMSNorm -> q,k,v (d x d) -> causal SDPA -> o; RMSNorm -> SwiGLU (d -> h -> d). x (B, S, d)."""

    def __init__(self, d: int = 4096, hidden: int = 14336, heads: int = 32):
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.w1, self.w3 = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)

    def forward(self, x):
        b, s, d = x.shape
        h = self.n1(x)
        q, k, v = (w(h).view(b, s, self.heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + self.wo(a)
        h = self.n2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


def _block_case():
    """The bf16 block on the GPU, its input (16k tokens), upstream gradient, and GEMM FLOPs of one fwd+bwd."""
    tokens, d, hidden = 16384, 4096, 14336
    b, s = tokens // 2048, 2048
    flops = 6 * tokens * (4 * d * d + 3 * d * hidden)
    torch.manual_seed(0)
    base = _LlamaBlock(d, hidden).to("cuda", torch.bfloat16)
    x = torch.randn(b, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return base, x, torch.randn_like(x), flops


def _time_block(fn, x, grad, flops: int, args) -> dict | str:
    """ms and linear TFLOP/s of one fwd+bwd of ``fn``, or why it failed."""
    try:
        t = _median_ms(_fwd_bwd(fn, x, grad), args.warmup, args.reps)
    except Exception as exc:  # noqa: BLE001
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return {"ms": round(t, 3), "tflops_linear": round(flops / t / 1e9, 1)}


# ---------------------------------------------------------------------------- modes
def probe() -> dict:
    """What this GPU's _scaled_mm accepts: scalings, formats and layouts."""
    results = {"native_blockwise": native_blockwise_support("cuda") or "yes"}
    x = torch.randn(256, 512, device="cuda")
    w = torch.randn(384, 512, device="cuda")
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    cases = {
        "tensor e4m3 x e4m3": (e4, e4, Granularity.TENSOR, Granularity.TENSOR),
        "tensor e5m2 x e4m3": (e5, e4, Granularity.TENSOR, Granularity.TENSOR),
        "row e4m3 x e4m3": (e4, e4, Granularity.ROW, Granularity.ROW),
        "row e5m2 x e4m3": (e5, e4, Granularity.ROW, Granularity.ROW),
        "block 1x128 x 128x128 e4m3": (e4, e4, Granularity.BLOCK_1X128, Granularity.BLOCK_128X128),
        "block 1x128 x 1x128 e4m3": (e4, e4, Granularity.BLOCK_1X128, Granularity.BLOCK_1X128),
        "block 1x128 e5m2 x 128x128 e4m3": (e5, e4, Granularity.BLOCK_1X128, Granularity.BLOCK_128X128),
    }
    for name, (da, db, ga, gb) in cases.items():
        a, b = quantize(x, da, ga), quantize(w, db, gb)
        try:
            got = scaled_gemm(a, b, torch.float32)
            want = scaled_gemm(a, b, torch.float32, emulate=True)
            err = float((got - want).norm() / want.norm())
            results[name] = f"ok (relative difference from emulation {err:.1e})"
        except Exception as exc:  # noqa: BLE001 - recording what fails is the point
            results[name] = f"fails: {str(exc).splitlines()[0][:160]}"
    a, b = quantize(x, e4, Granularity.TENSOR), quantize(w, e4, Granularity.TENSOR)
    for name, call in {
        "B row-major (must fail)": lambda: torch._scaled_mm(a.data, b.data.t().contiguous(), a.scale, b.scale,
                                                            out_dtype=torch.bfloat16),
        "K=504 not /16 (must fail)": lambda: torch._scaled_mm(a.data[:, :504], b.data[:, :504].t(), a.scale,
                                                              b.scale, out_dtype=torch.bfloat16),
    }.items():
        try:
            call()
            results[name] = "accepted"
        except Exception as exc:  # noqa: BLE001
            results[name] = f"rejected: {str(exc).splitlines()[0][:160]}"
    return results


def table(args, save) -> dict:
    """Speed-ups of each recipe over bf16 on GRID (compiled, dynamic shapes)."""
    shapes = [(m, k, n) for m in GRID["M"] for k in GRID["K"] for n in GRID["N"]]
    ms: dict[str, dict[str, float]] = {}
    variants = {name: fn for name, fn in _variants(16384, False).items() if "+auto" not in name
                and name != "attnkit:delayed"}
    for name, convert in variants.items():
        torch._dynamo.reset()
        ms[name] = {}
        for m, k, n in shapes:
            torch.manual_seed(0)
            module = convert(nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16))
            compiled = torch.compile(module, dynamic=True)
            x, grad = _linear_case(m, k, n)
            ms[name][f"{m}x{k}x{n}"] = round(_median_ms(_fwd_bwd(compiled, x, grad), args.warmup, args.reps), 4)
            save({"ms": ms})
        print(name, ms[name], flush=True)
    speedup = {name.split(":")[1]: {s: round(ms["bf16"][s] / t, 3) for s, t in v.items()}
               for name, v in ms.items() if name != "bf16"}
    return {"grid": GRID, "ms": ms, "speedup": speedup, "compile": "torch.compile(dynamic=True)",
            "timing": f"median of {args.reps} CUDA-event fwd+bwd after {args.warmup} warm-ups"}


def anchors(args, save) -> dict:
    """The issue's anchor shapes and the Llama-style block (saved after every measurement)."""
    out = {"linear": {}, "llama_block": {}}
    start = time.time()
    variants = _variants(16384, not args.no_torchao)
    for name, convert in variants.items():
        numerics_only = name in ("attnkit:delayed", "attnkit:rowwise_with_gw_hp")  # time-boxed out
        if numerics_only or args.block_only:
            continue
        if time.time() - start > args.budget_s:
            out["linear"][name] = "skipped: budget"
            continue
        torch._dynamo.reset()
        rows = {}
        for m, k, n in ANCHORS:
            auto = Float8TrainingConfig(auto_filter=True, auto_filter_tokens=m)
            conv = (lambda mod: convert_to_float8_training(mod, config=auto)) if name.endswith("+auto") else convert
            torch.manual_seed(0)
            module = conv(nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16))
            x, grad = _linear_case(m, k, n)
            try:
                t = _median_ms(_fwd_bwd(torch.compile(module, dynamic=True), x, grad), args.warmup, args.reps)
                rows[f"{m}x{k}x{n}"] = {"ms": round(t, 4), "tflops": round(6 * m * k * n / t / 1e9, 1)}
            except Exception as exc:  # noqa: BLE001
                rows[f"{m}x{k}x{n}"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            del module, x, grad
        out["linear"][name] = rows
        _speedups(out)
        save(out)
        print(name, rows, flush=True)

    base, x, grad, flops = _block_case()
    compiled = ("bf16", "attnkit:tensorwise", "torchao:tensorwise", "attnkit:tensorwise+auto",
                "attnkit:rowwise", "torchao:rowwise")
    modes = [(name, variants[name], False) for name in ("bf16", "attnkit:tensorwise")]
    modes += [(name, variants[name], True) for name in compiled if name in variants]
    for name, convert, compiled in modes:
        key = f"{name} ({'compiled' if compiled else 'eager'})"
        if time.time() - start > args.budget_s:
            out["llama_block"][key] = "skipped: budget"
            continue
        torch._dynamo.reset()
        module = convert(copy.deepcopy(base))
        fn = torch.compile(module) if compiled else module
        out["llama_block"][key] = _time_block(fn, x, grad, flops, args)
        if name.endswith("+auto") and isinstance(out["llama_block"][key], dict):
            plan = conversion_plan(copy.deepcopy(base), config=Float8TrainingConfig(auto_filter=True))
            out["llama_block"][key]["kept_bf16"] = {k: v for k, v in plan.items() if v}
        _speedups(out)
        save(out)
        print(key, out["llama_block"][key], flush=True)
        del module, fn
    _speedups(out)
    return out


def eager_block(args, save) -> dict:
    """The Llama-style block without torch.compile: bf16, every recipe, torch-cast baselines, torchao."""
    out = {"llama_block": {}, "casts": f"fused Triton casts (triton {_triton_version()}) unless 'torch-casts'"}
    variants = _variants(16384, not args.no_torchao)
    base, x, grad, flops = _block_case()
    modes = [(name, convert, False) for name, convert in variants.items() if "+auto" not in name]
    # the same recipes with Float8Linear's Triton dispatch switched off: what the fused casts save
    modes += [(name, variants[name], True) for name in ("attnkit:tensorwise", "attnkit:rowwise")]
    for name, convert, torch_casts in modes:
        key = f"{name}{'/torch-casts' if torch_casts else ''} (eager)"
        module = convert(copy.deepcopy(base))
        casts = (mock.patch.object(attnkit.fp8.linear, "_fused_casts", lambda t, granularity: None)
                 if torch_casts else contextlib.nullcontext())
        with casts:
            out["llama_block"][key] = _time_block(module, x, grad, flops, args)
        del module
        _speedups(out)
        save(out)
        print(key, out["llama_block"][key], flush=True)
    return out


def gap(args, save) -> dict:
    """Tensorwise attnkit vs torchao vs bf16 per anchor shape: static compile, raced, kernels by name."""
    out = {"compile": "torch.compile per shape (static)", "timing": f"attnkit.bench.race: {args.rounds} interleaved "
           f"rounds x {args.reps} fwd+bwd after {args.warmup} warm-ups; speed-up = median paired ratio", "shapes": {}}
    variants = {name: fn for name, fn in _variants(16384, not args.no_torchao).items()
                if name in ("bf16", "attnkit:tensorwise", "torchao:tensorwise")}
    for m, k, n in args.gap_shapes:
        torch._dynamo.reset()
        x, grad = _linear_case(m, k, n)
        steps = {}
        for name, convert in variants.items():
            torch.manual_seed(0)
            module = torch.compile(convert(nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)))
            steps[name] = _fwd_bwd(module, x, grad)
            steps[name]()  # compile outside the race
        entries = race(steps, baseline="bf16", rounds=args.rounds, repeats=args.reps, warmup=args.warmup, device="cuda")
        row = {name: {"median_ms": round(e.median_ms, 4), "speedup": None if e.speedup is None else round(e.speedup, 3),
                      "ratios": [round(r, 3) for r in e.ratios], "error": e.error}
               for name, e in entries.items()}
        for name, step in steps.items():
            count, by_name = kernel_stats(step, iters=3)
            top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
            row[name]["kernels_per_step"] = count
            row[name]["kernel_ms"] = round(sum(by_name.values()), 4)
            row[name]["top_kernels_ms"] = {kname[:160]: round(ms, 4) for kname, ms in top}
        out["shapes"][f"{m}x{k}x{n}"] = row
        save(out)
        print(f"{m}x{k}x{n}", {name: (r["median_ms"], r["speedup"], r["kernel_ms"]) for name, r in row.items()}, flush=True)
        del steps, x, grad
    return out


def _speedups(out: dict) -> None:
    for section in ("linear", "llama_block"):
        if section not in out:
            continue
        res = out[section]
        if section == "linear":
            base = res.get("bf16", {})
            out[f"{section}_speedup"] = {
                name: {s: round(base[s]["ms"] / r["ms"], 3) for s, r in rows.items()
                       if isinstance(r, dict) and isinstance(base.get(s), dict)}
                for name, rows in res.items() if isinstance(rows, dict) and name != "bf16"}
        else:
            speed = {}
            for key, r in res.items():
                mode = key.split(" ")[-1]
                ref = res.get(f"bf16 {mode}")
                if isinstance(r, dict) and isinstance(ref, dict) and not key.startswith("bf16"):
                    speed[key] = round(ref["ms"] / r["ms"], 3)
            out[f"{section}_speedup"] = speed


def _shapes(text: str) -> list[tuple[int, int, int]]:
    """``"8192x8192x8192,16384x8192x8192"`` -> [(M, K, N), ...]: positive multiples of 16 (``_scaled_mm``)."""
    shapes = []
    for item in text.split(","):
        dims = item.strip().split("x")
        if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 and int(d) % 16 == 0 for d in dims):
            raise argparse.ArgumentTypeError(f"expected MxKxN with positive multiples of 16 (e.g. 8192x8192x8192), got {item!r}")
        shapes.append(tuple(int(d) for d in dims))
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON files")
    parser.add_argument("--probe", action="store_true")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--anchors", action="store_true")
    parser.add_argument("--eager", action="store_true", help="the Llama-style block without torch.compile")
    parser.add_argument("--gap", action="store_true", help="tensorwise vs torchao vs bf16: static compile, raced, kernels")
    parser.add_argument("--no-torchao", action="store_true", help="skip the torchao peer")
    parser.add_argument("--block-only", action="store_true", help="--anchors: only the Llama-style block (no linear shapes)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7, help="--gap: interleaved rounds")
    parser.add_argument("--gap-shapes", type=_shapes, default="8192x8192x8192,16384x8192x8192",
                        help="--gap: MxKxN shapes, comma-separated")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop starting anchor variants after this")
    args = parser.parse_args()
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    props = torch.cuda.get_device_properties(0)
    slug = re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-")
    date = datetime.date.today().isoformat()
    header = {"device": props.name, "torch": torch.__version__, "cuda": torch.version.cuda, "date": date,
              "command": "python " + " ".join(sys.argv), "torchao": _torchao()[0], "triton": _triton_version()}
    args.out.mkdir(parents=True, exist_ok=True)
    for mode, fn in (("probe", probe), ("table", table), ("bench", anchors), ("eager", eager_block), ("gap", gap)):
        if not getattr(args, "anchors" if mode == "bench" else mode):
            continue
        path = args.out / f"fp8-{mode}-{slug}-{date}.json"

        def save(body, path=path):
            path.write_text(json.dumps({**header, **body}, indent=1))
        try:
            body = fn() if mode == "probe" else fn(args, save)
        except Exception:  # noqa: BLE001 - keep what the other modes measured
            body = {"error": traceback.format_exc()[-2000:]}
        save(body)
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
