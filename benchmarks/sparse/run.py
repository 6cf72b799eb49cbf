"""GPU benchmark of sparse attention against the fastest dense kernel, one JSON file.

    PYTHONPATH=src python benchmarks/sparse/run.py --out $OUT            # ~3-4 min on an H100
    PYTHONPATH=src python benchmarks/sparse/run.py --out /tmp/b --quick  # 8k only

B1 H16 D128 bf16, S = 32k and 128k, forward and forward+backward (CUDA-event medians):
cuDNN SDPA dense causal, FlexAttention dense causal, and each pattern (causal window 2048,
16 packed documents, BigBird, content-aware top-k at ~0.1 block density, selection and
BlockMask build included) through ``sparse_attention``. Per row: ms, speed-up vs cuDNN dense,
% of ideal (ideal = cuDNN dense causal ms x block density / causal block density), and mask
build times: ours for a new shape and for a repeated one vs ``create_block_mask(_compile=True)``.
A forward check at S=2048 compares FlexAttention with the gathered path on the same BlockMasks.
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
from torch.nn.attention.flex_attention import create_block_mask

from attnkit.bench.timing import time_fn
from attnkit.ops import attention, clear_caches
from attnkit.sparse import BigBird, Causal, ContentAware, Documents, SlidingWindow, gathered_attention, select_blocks, sparse_attention

BLOCK = 128


def cases(length: int) -> list[tuple[str, object]]:
    return [
        ("flex dense causal", Causal()),
        ("window 2048", SlidingWindow(2048)),
        ("16 packed documents", Documents((length // 16,) * 16)),
        ("bigbird w1024 g128 r4", BigBird(1024, num_global=128, num_random=4, block=BLOCK)),
        ("top-k density 0.2 of causal", ContentAware(block_size=BLOCK, density=0.2)),
    ]


def _sync_ms(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def build_times(length: int) -> dict:
    """Mask construction: ours (new shape after warm-up, repeated shape) vs create_block_mask(_compile=True)."""
    result = {}
    for name, pattern in (("window 2048", SlidingWindow(2048)), ("16 packed documents", Documents((length // 16,) * 16))):
        clear_caches()
        pattern.block_mask(length, length, block_size=BLOCK, device="cuda")  # warm-up (first CUDA kernels)
        new = []
        for step in range(1, 6):  # a new sequence length each time: nothing cached
            shorter = length - step * BLOCK
            shaped = Documents((shorter // 16,) * 15 + (shorter - 15 * (shorter // 16),)) if isinstance(pattern, Documents) else pattern
            new.append(_sync_ms(lambda: shaped.block_mask(shorter, shorter, block_size=BLOCK, device="cuda")))
        repeated = [_sync_ms(lambda: pattern.block_mask(length, length, block_size=BLOCK, device="cuda")) for _ in range(20)]
        mask_mod = pattern.mask_mod(length, length, "cuda")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            build = lambda: create_block_mask(mask_mod, None, None, length, length, device="cuda", BLOCK_SIZE=BLOCK, _compile=True)  # noqa: E731
            first = _sync_ms(build)
            steady = [_sync_ms(build) for _ in range(5)]
        result[name] = {
            "ours_new_shape_ms": statistics.median(new),
            "ours_repeated_ms": statistics.median(repeated),
            "create_block_mask_compile_first_ms": first,
            "create_block_mask_compile_ms": statistics.median(steady),
        }
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
    rows.append({"case": "cuDNN SDPA dense causal", "block_density": causal_density, **{f"{m}_ms": t for m, t in dense.items()}})
    for name, pattern in cases(length):
        if isinstance(pattern, ContentAware):
            density = select_blocks(q.detach(), k.detach(), pattern).density
        else:
            density = pattern.density(length, block_size=BLOCK)
        row = {"case": name, "pattern": repr(pattern), "block_density": density}
        for mode in ("fwd", "fwd+bwd"):
            ms = timed(lambda: sparse_attention(q, k, v, pattern, block_size=BLOCK), mode == "fwd+bwd")
            row[f"{mode}_ms"] = ms
            if ms is not None and dense[mode] is not None:
                ideal = dense[mode] * density / causal_density
                row[f"{mode}_speedup_vs_cudnn"] = dense[mode] / ms
                row[f"{mode}_pct_of_ideal"] = 100 * ideal / ms
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"seq_len": length, "rows": rows}


def check(length: int = 2048) -> dict:
    """Forward max |flex - gathered| on the same BlockMask (float32)."""
    q, k, v = (torch.randn(1, 4, length, 64, device="cuda") for _ in range(3))
    errors = {}
    for name, pattern in cases(length):
        if isinstance(pattern, ContentAware):
            continue
        block_mask = pattern.block_mask(length, length, block_size=BLOCK, device="cuda")
        flex = sparse_attention(q, k, v, block_mask)
        gathered, _ = gathered_attention(q, k, v, block_mask, scale=64**-0.5)
        errors[name] = float((flex - gathered).abs().max())
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON file")
    parser.add_argument("--quick", action="store_true", help="S = 8k only")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=210.0, help="skip timings that would start after this")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    config = torch._dynamo.config  # one compiled FlexAttention per (mask, length, grad mode): more than the default 8
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))
    deadline = time.perf_counter() + args.budget_s
    lengths = [8192] if args.quick else [32768, 131072]
    report = {
        "schema": 1,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "PYTHONPATH=src python " + " ".join(sys.argv),
        "shape": {"batch": 1, "heads": 16, "head_dim": 128, "dtype": "bfloat16", "block_size": BLOCK},
        "ideal": "cuDNN dense causal ms x block_density / causal block_density",
        "check_flex_vs_gathered_max_abs": check(),
        "results": [],
        "mask_build": {},
    }
    for length in lengths:
        report["results"].append(measure(length, args.repeats, deadline))
        report["mask_build"][str(length)] = build_times(length)
        print(json.dumps(report["mask_build"][str(length)]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = report["device"].lower().replace(" ", "-")
    path = args.out / f"sparse-{name}-{report['date']}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
