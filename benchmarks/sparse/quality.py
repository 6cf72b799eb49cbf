"""Quality of sparse attention on a model with real attention: a byte-level GPT trained on the
Python standard library's own sources, evaluated dense vs every pattern and content-aware setting.

    PYTHONPATH=src python benchmarks/sparse/quality.py --out benchmarks/results/sparse   # 285 CPU-s training + eval, 1 thread

Random-weight models attend almost uniformly, so they cannot tell a good sparsity pattern from
a bad one; this one (``stdlib_gpt.py``, shared with ``train.py``) is trained (``--train-seconds`` on one CPU thread, nothing saved). Held-out
files (a fixed CRC split of their paths) give, per setting: loss and perplexity (every layer
sparse) and their change vs dense; and, per layer and head, on the dense model's own q/k/v:
attention-mass recall (dense probability inside the computed mask), output relative L2 vs dense,
and log-sum-exp error. Writes ``quality-<device>-<date>.json`` (device, torch, date, command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

try:
    import attnkit  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import torch
import torch.nn.functional as F
from stdlib_gpt import GPT, corpus, learning_rate, sample_windows

from attnkit.sparse import (
    BigBird, Causal, ContentAware, Dilated, Documents, GlobalTokens, Pattern, SlidingWindow, select_blocks, sparse_attention,
)  # fmt: skip


def train(model: GPT, data: torch.Tensor, *, seconds: float, batch: int, context: int, lr: float, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    # The budget is CPU time of this (single-threaded) process: one core, however busy the machine.
    start, wall, step, losses = time.process_time(), time.perf_counter(), 0, []
    while (elapsed := time.process_time() - start) < seconds:
        for group in optimizer.param_groups:  # warm-up, then cosine over the time budget
            group["lr"] = learning_rate(lr, step, elapsed / seconds)
        window = sample_windows(data, batch, context, generator)
        loss = F.cross_entropy(model(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
    return {"steps": step, "cpu_seconds": round(time.process_time() - start, 1), "wall_seconds": round(time.perf_counter() - wall, 1),
            "tokens": step * batch * context, "final_train_loss": sum(losses[-20:]) / len(losses[-20:])}  # fmt: skip


def settings(context: int) -> list[tuple[str, object, int]]:
    """(name, pattern or ContentAware, block size)."""
    static: list[tuple[str, Pattern]] = [
        ("causal (sparse path)", Causal()),
        ("window 64", SlidingWindow(64)),
        ("window 128", SlidingWindow(128)),
        ("window 256", SlidingWindow(256)),
        ("window 64 + 4 sinks", SlidingWindow(64) | GlobalTokens(4)),
        ("window 32 | dilated 8", SlidingWindow(32) | Dilated(8)),
        ("bigbird w64 g4 r2", BigBird(64, num_global=4, num_random=2, block=64)),
        ("4 documents", Documents((context // 4,) * 4)),
        ("2 documents", Documents((context // 2,) * 2)),
    ]
    content = [(f"top-{k} of 32-blocks", ContentAware(block_size=32, topk=k)) for k in (2, 4, 6)]
    content += [(f"mass {m} of 32-blocks", ContentAware(block_size=32, mass=m)) for m in (0.8, 0.9, 0.95, 0.99)]
    content += [("density 0.25 of 32-blocks", ContentAware(block_size=32, density=0.25))]
    return [(name, p, 64) for name, p in static] + [(name, c, c.block_size) for name, c in content]


def allowed_mask(setting, block: int, q, k) -> torch.Tensor:
    """Elements computed, ``(B|1, H|1, S, S)`` bool."""
    length = q.shape[2]
    if isinstance(setting, ContentAware):
        selection = select_blocks(q, k, setting)
        blocks = selection.blocks.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :length, :length]
        return blocks & setting.base.to_dense(length, device=q.device)
    return setting.to_dense(length, device=q.device)[None, None]


@torch.no_grad()
def evaluate(model: GPT, windows: torch.Tensor, setting, block: int) -> dict:
    inputs, targets = windows[:, :-1], windows[:, 1:]
    attend = None if setting is None else (lambda q, k, v, layer: sparse_attention(q, k, v, setting, block_size=block))
    loss = F.cross_entropy(model(inputs, attend).flatten(0, 1), targets.flatten()).item()
    record = {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss / math.log(2)}
    if setting is None:
        return record
    heads = []  # per layer: recall, output rel L2, lse error per head

    def probe(q, k, v, layer):
        dense, dense_lse = _dense(q, k, v)
        out, lse = sparse_attention(q, k, v, setting, block_size=block, return_lse=True)
        mask = allowed_mask(setting, block, q, k)
        probs = torch.exp(((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).masked_fill(~Causal().to_dense(q.shape[2], device=q.device), -math.inf) - dense_lse[..., None])
        recall = (probs * mask).sum((-1, -2)) / probs.sum((-1, -2))  # (B, H)
        rel_l2 = (out - dense).flatten(2).norm(dim=-1) / dense.flatten(2).norm(dim=-1)
        heads.append({
            "layer": layer,
            "mass_recall": recall.mean(0).tolist(),
            "output_rel_l2": rel_l2.mean(0).tolist(),
            "lse_abs_error": (lse - dense_lse).abs().mean((0, 2)).tolist(),
            "block_density": _density(setting, block, q, k),
        })  # fmt: skip
        return dense

    model(inputs, probe)
    record["per_layer"] = heads
    record["block_density"] = sum(h["block_density"] for h in heads) / len(heads)
    record["mass_recall_min_head"] = min(min(h["mass_recall"]) for h in heads)
    record["mass_recall_mean"] = sum(sum(h["mass_recall"]) for h in heads) / sum(len(h["mass_recall"]) for h in heads)
    record["output_rel_l2_mean"] = sum(sum(h["output_rel_l2"]) for h in heads) / sum(len(h["output_rel_l2"]) for h in heads)
    return record


def _dense(q, k, v):
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~Causal().to_dense(q.shape[2], device=q.device), -math.inf)
    lse = torch.logsumexp(scores, -1)
    return torch.softmax(scores, -1) @ v, lse


def _density(setting, block: int, q, k) -> float:
    if isinstance(setting, ContentAware):
        return select_blocks(q, k, setting).density
    return setting.density(q.shape[2], block_size=block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON file")
    parser.add_argument("--train-seconds", type=float, default=285.0, help="training budget in CPU seconds of one thread")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows of --context bytes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    train_data, valid_data, files = corpus()
    model = GPT()
    print(f"corpus: {files} files, {train_data.numel() / 1e6:.1f} MB train, {valid_data.numel() / 1e6:.1f} MB held out", flush=True)
    training = train(model, train_data, seconds=args.train_seconds, batch=args.batch, context=args.context, lr=3e-3, seed=args.seed)
    print(f"trained: {training}", flush=True)
    model.eval()
    stride = (valid_data.numel() - args.context - 1) // args.eval_windows
    windows = torch.stack([valid_data[i * stride : i * stride + args.context + 1] for i in range(args.eval_windows)])

    dense = evaluate(model, windows, None, 64)
    results = [{"setting": "dense (SDPA causal)", "pattern": None, **dense}]
    print(f"{'setting':<28} {'density':>8} {'loss':>7} {'delta %':>8} {'recall':>7} {'min rec':>7} {'rel L2':>7}", flush=True)
    for name, setting, block in settings(args.context):
        record = evaluate(model, windows, setting, block)
        record["loss_delta_pct"] = 100 * (record["loss"] - dense["loss"]) / dense["loss"]
        results.append({"setting": name, "pattern": repr(setting), "block_size": block, **record})
        print(f"{name:<28} {record['block_density']:8.3f} {record['loss']:7.4f} {record['loss_delta_pct']:8.2f} "
              f"{record['mass_recall_mean']:7.3f} {record['mass_recall_min_head']:7.3f} {record['output_rel_l2_mean']:7.3f}", flush=True)  # fmt: skip

    date = datetime.date.today().isoformat()
    report = {
        "schema": 1,
        "device": "cpu",
        "torch": torch.__version__,
        "date": date,
        "command": "PYTHONPATH=src python " + " ".join(sys.argv),
        "model": {"layers": 4, "dim": 128, "heads": 4, "context": args.context, "vocab": 256, "positions": "rotary", "params": sum(p.numel() for p in model.parameters())},
        "data": {"source": "Python stdlib .py files (no tests)", "files": files, "train_bytes": train_data.numel(), "valid_bytes": valid_data.numel(),
                 "split": "held out iff crc32(relative path) % 10 == 0", "eval_windows": args.eval_windows},  # fmt: skip
        "training": training,
        "density_note": "block_density = computed block pairs / all block pairs (causal dense = 0.5625 at 8x8 blocks, 0.53 at 16x16)",
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"quality-cpu-{date}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
