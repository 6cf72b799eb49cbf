"""Convergence of FP8 training: a small GPT on the Python standard library's own source, byte level.

    PYTHONPATH=src python benchmarks/fp8/convergence.py --out $OUT --steps 400       # GPU, ~2 min
    python benchmarks/fp8/convergence.py --plot benchmarks/results/fp8/fp8-convergence-*.json

Every run trains the same nanoGPT-style model (same init, same batches) in bf16 autocast and with
each FP8 recipe (all block linears converted, ``lm_head`` kept in bf16 as torchao recommends),
AdamW with warm-up and cosine decay, steps guarded by ``Float8TrainStep``. Writes
``fp8-convergence-<device>-<date>.json``: per recipe the train-loss curve, validation loss, final
loss relative to bf16, skipped steps and ms/step (eager, so FP8 is not faster here).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
import time
from pathlib import Path

try:
    import attnkit  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared corpus

import torch
import torch.nn.functional as F
from torch import nn

from stdlib_corpus import corpus  # noqa: E402
from attnkit.fp8 import Float8TrainingConfig, Float8TrainStep, convert_to_float8_training, native_blockwise_support

RECIPES = ["tensorwise", "rowwise", "rowwise_with_gw_hp", "blockwise", "delayed"]


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, S, hs)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Byte-level GPT: embeddings (256 tokens, learned positions), ``layers`` blocks, tied-free lm_head."""

    def __init__(self, d: int = 384, layers: int = 4, heads: int = 6, seq: int = 256):
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln, self.lm_head = nn.LayerNorm(d), nn.Linear(d, 256, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln(x))  # (B, S, 256)


def _batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq - 1, (steps, batch), generator=gen)
    return starts


def train(recipe: str, data, val, args, device) -> dict:
    torch.manual_seed(0)
    model = GPT(args.d, args.layers, args.heads, args.seq).to(device)
    if recipe != "bf16":
        config = Float8TrainingConfig.from_recipe_name(recipe, emulate=device != "cuda")
        model = convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn != "lm_head")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    guard = Float8TrainStep(model, opt)
    warm = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, args.steps) / args.steps)))
    starts = _batches(data, args.steps, args.batch, args.seq, seed=1)
    offsets = torch.arange(args.seq + 1)
    losses, t0 = [], None
    for i in range(args.steps):
        if i == 5:
            torch.cuda.synchronize() if device == "cuda" else None
            t0 = time.time()
        chunk = data[(starts[i][:, None] + offsets)].to(device, torch.long)
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.float().view(-1, 256), chunk[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        guard()
        sched.step()
        losses.append(round(loss.item(), 5))
    if device == "cuda":
        torch.cuda.synchronize()
    ms = (time.time() - t0) * 1000 / max(1, args.steps - 5)
    model.eval()
    vstarts = _batches(val, args.val_batches, args.batch, args.seq, seed=2)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        vl = [F.cross_entropy(model(c[:, :-1]).float().view(-1, 256), c[:, 1:].reshape(-1)).item()
              for c in (val[(s[:, None] + offsets)].to(device, torch.long) for s in vstarts)]
    tail = losses[-args.tail:]
    return {"train_loss": losses, "final_train_loss": sum(tail) / len(tail), "val_loss": sum(vl) / len(vl),
            "skipped_steps": guard.stats.skipped, "nan_losses": sum(not math.isfinite(v) for v in losses),
            "ms_per_step_eager": round(ms, 2)}


def plot(path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = json.loads(path.read_text())
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, run in record["runs"].items():
        if not isinstance(run, dict):
            continue
        y = torch.tensor(run["train_loss"])
        smooth = torch.nn.functional.avg_pool1d(y[None, None], 9, 1, 4, count_include_pad=False)[0, 0]
        ax.plot(smooth.tolist(), label=f"{name} (val {run['val_loss']:.3f})", lw=1)
    ax.set(xlabel="step", ylabel="train loss (nats/byte, 9-step mean)", yscale="log",
           title=f"FP8 vs bf16: byte-level GPT on the stdlib, {record['device']}")
    ax.legend()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, help="plot a convergence JSON to PNG beside it and exit")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tail", type=int, default=50, help="final loss = mean of the last TAIL steps")
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    args = parser.parse_args()
    if args.plot:
        return plot(args.plot)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_data, val, files = corpus()
    recipes = ["bf16"] + [r for r in args.recipes.split(",") if r]
    if device == "cuda" and native_blockwise_support("cuda") is not None and "blockwise" in recipes:
        recipes.remove("blockwise")
    runs = {}
    for recipe in recipes:
        try:
            runs[recipe] = train(recipe, train_data, val, args, device)
        except Exception as exc:  # noqa: BLE001 - record and go on with the other recipes
            runs[recipe] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        r = runs[recipe]
        print(recipe, {k: v for k, v in r.items() if k != "train_loss"} if isinstance(r, dict) else r, flush=True)
    base = runs["bf16"]
    for name, run in runs.items():
        if isinstance(run, dict) and isinstance(base, dict):
            run["final_vs_bf16_pct"] = round(100 * (run["final_train_loss"] / base["final_train_loss"] - 1), 3)
            run["val_vs_bf16_pct"] = round(100 * (run["val_loss"] / base["val_loss"] - 1), 3)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    record = {"device": name, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "command": "python " + " ".join(sys.argv), "data": f"stdlib *.py (tests left out), {files} files: {train_data.numel()} train / {val.numel()} validation bytes, held out by path hash",
              "model": {k: getattr(args, k) for k in ("d", "layers", "heads", "seq", "batch", "steps", "lr")},
              "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fp8-convergence-{slug}-{record['date']}.json"
    path.write_text(json.dumps(record))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
