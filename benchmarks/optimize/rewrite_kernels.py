"""CUDA kernels of one ViT-B/16 training step at batch 64 (bf16), eager and ``optimize``'s rewrite, for one attnkit tree.

A diagnostic beside ``rewrite_ratio.py`` (whose helpers it uses, so it runs against wave 1's tree too): 3 steps
under ``torch.profiler`` after 3 warm-up steps; per variant the kernel time and count per step and the 22
kernels with the most time. Run once per tree and compare the lists (how the heads-first split of
``MultiHeadAttention``'s packed projection was found to cost a non-vectorized cat and 12 copies per step).

    PYTHONPATH=<tree>/src python benchmarks/optimize/rewrite_kernels.py <label>
"""

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from rewrite_ratio import _slice, _training_fn  # noqa: E402

from attnkit.models import build_model  # noqa: E402
from attnkit.optimize import OptimizeConfig, optimize  # noqa: E402


def kernels(fn, steps: int = 3) -> tuple[float, float, list[tuple[str, float, float]]]:
    """(kernel ms per step, kernels per step, the top 22 as (name, count per step, ms per step))."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows: dict[str, list] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            row = rows.setdefault(event.name[:110], [0, 0.0])
            row[0] += 1
            row[1] += event.device_time_total / 1e3
    total = sum(v[1] for v in rows.values()) / steps
    top = sorted(rows.items(), key=lambda kv: -kv[1][1])[:22]
    return total, sum(v[0] for v in rows.values()) / steps, [(k, v[0] / steps, round(v[1] / steps, 3)) for k, v in top]


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else "tree"
    zoo = build_model("vit_b_16", batch_size=64, dtype=torch.bfloat16, device="cuda")
    model, x, kw = zoo.model.eval(), zoo.example_inputs, zoo.example_kwargs
    config = OptimizeConfig(dtype=torch.bfloat16, check=False, measure=False)
    rewrite, _ = optimize(model, _slice(x, 1), example_kwargs=_slice(kw, 1), config=config)
    for name, module in (("eager", model), ("rewrite", rewrite)):
        module.train(True)
        total, count, top = kernels(_training_fn(module, x, kw))
        print(f"[{label}] vit train {name}: device {total:.2f} ms/step, {count:.0f} kernels")
        for kernel, per_step, ms in top:
            print(f"   {ms:8.3f} ms  x{per_step:5.0f}  {kernel}")
    print(f"[{label}] vit rewrite modules:", sorted({type(m).__name__ for m in rewrite.modules()}))


if __name__ == "__main__":
    main()
