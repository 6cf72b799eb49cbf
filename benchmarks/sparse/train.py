"""Training with sparse attention vs dense: the same byte-level GPT (``stdlib_gpt.py``), the same
init and the same batches, trained for the same steps with dense causal attention, content-aware
block sparsity (``ContentAware``) and a static sliding window; final train / validation loss and
their change vs dense, loss curves, and on the dense-trained model the content-aware setting's
attention-mass recall, density and loss change (``quality.evaluate``, the dense model's own q/k/v).

    PYTHONPATH=src python benchmarks/sparse/train.py --preset smoke --out /tmp/sparse-train   # CPU, < 60 s
    PYTHONPATH=src python benchmarks/sparse/train.py --preset gpu --out $OUT                  # one GPU, ~2-3 min

Gradients flow through the selected blocks: the ``sparse`` backend's backward is the gathered
path on CPU and compiled FlexAttention on CUDA; the selection itself is not differentiated.
Writes ``sparse-train-<device>-<date>.json`` (device, torch, date, command, config, per-run
curves) and, with matplotlib installed, a PNG of the curves beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import attnkit  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import torch
import torch.nn.functional as F
from quality import evaluate
from stdlib_gpt import GPT, corpus, learning_rate, sample_windows

from attnkit.sparse import ContentAware, SlidingWindow, sparse_attention


@dataclass(frozen=True)
class TrainConfig:
    """One comparison: model size, data, steps and the sparse settings (see :data:`PRESETS`)."""

    layers: int
    dim: int
    heads: int
    context: int
    """Bytes per training window (the attention's sequence length)."""
    batch: int
    steps: int
    block: int
    """Tokens per block of both sparse settings' BlockMasks."""
    mass: float
    """``ContentAware(mass=...)``: keep the fewest blocks whose estimated softmax mass reaches it."""
    window: int
    """``SlidingWindow(window)``, the static comparison."""
    lr: float = 3e-3
    eval_windows: int = 16
    """Held-out windows of ``context`` bytes for the validation loss."""
    curve_every: int = 10
    """Steps per point of the saved loss curves (each point: the mean of those steps)."""


PRESETS = {  # smoke: mass 0.8, as an early model attends almost uniformly and 0.95 would keep every block
    "smoke": TrainConfig(layers=2, dim=64, heads=2, context=256, batch=4, steps=120, block=32, mass=0.8, window=64, eval_windows=8, curve_every=5),
    "gpu": TrainConfig(layers=4, dim=256, heads=4, context=2048, batch=16, steps=600, block=128, mass=0.95, window=256),
}


def _settings(config: TrainConfig) -> dict[str, object]:
    return {"dense": None, "content-aware": ContentAware(block_size=config.block, mass=config.mass), "window": SlidingWindow(config.window)}


def _attend(setting, block: int):
    if setting is None:
        return None  # the model's causal SDPA
    return lambda q, k, v, layer: sparse_attention(q, k, v, setting, block_size=block)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def train_one(model: GPT, data: torch.Tensor, setting, config: TrainConfig, seed: int, device: torch.device) -> dict:
    """Train ``model`` in place for ``config.steps`` steps (AdamW, warm-up + cosine); returns the loss curve."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.1, betas=(0.9, 0.95))
    attend, losses, start = _attend(setting, config.block), [], time.perf_counter()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config.lr, step, step / config.steps)
        window = sample_windows(data, config.batch, config.context, generator).to(device)
        with _autocast(device):
            logits = model(window[:, :-1], attend)
        loss = F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.detach())
    curve = torch.stack(losses).float().cpu()
    every = config.curve_every
    tail = max(1, config.steps // 10)
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "final_train_loss": float(curve[-tail:].mean()),  # mean of the last 10% of steps
        "curve": {"step": list(range(every, config.steps + 1, every)), "loss": curve[: config.steps // every * every].view(-1, every).mean(1).tolist()},
    }  # fmt: skip


def compare(config: TrainConfig, *, seed: int = 0, device: torch.device = torch.device("cpu")) -> dict:
    """Train dense, content-aware and window copies of one initial model on the same batches; returns the report's runs."""
    train_data, valid_data, files = corpus()
    stride = (valid_data.numel() - config.context - 1) // config.eval_windows
    windows = torch.stack([valid_data[i * stride : i * stride + config.context + 1] for i in range(config.eval_windows)]).to(device)
    torch.manual_seed(seed)
    initial = GPT(config.layers, config.dim, config.heads).to(device)
    runs, models = {}, {}
    for name, setting in _settings(config).items():
        model = copy.deepcopy(initial)
        record = train_one(model, train_data, setting, config, seed, device)
        model.eval()
        # Each model with the attention it was trained with; for a sparse one also its density and recall there.
        evaluation = evaluate(model, windows, setting, config.block)
        record["valid_loss"] = evaluation["loss"]
        record.update({key: evaluation[key] for key in ("block_density", "mass_recall_mean", "mass_recall_min_head") if key in evaluation})
        runs[name], models[name] = {"setting": repr(setting) if setting else "dense causal SDPA", **record}, model
        print(f"{name:<14} train {record['final_train_loss']:.4f}  valid {record['valid_loss']:.4f}  "
              f"density {record.get('block_density', float('nan')):.3f}  {record['seconds']:.1f} s", flush=True)  # fmt: skip
    for name, run in runs.items():
        run["train_loss_delta_pct"] = 100 * (run["final_train_loss"] - runs["dense"]["final_train_loss"]) / runs["dense"]["final_train_loss"]
        run["valid_loss_delta_pct"] = 100 * (run["valid_loss"] - runs["dense"]["valid_loss"]) / runs["dense"]["valid_loss"]
    # The second check, on the dense-trained model: recall and loss change of the content-aware setting there.
    dense_eval = evaluate(models["dense"], windows, None, config.block)
    probe = evaluate(models["dense"], windows, _settings(config)["content-aware"], config.block)
    on_dense = {key: probe[key] for key in ("loss", "block_density", "mass_recall_mean", "mass_recall_min_head", "output_rel_l2_mean")}
    on_dense["loss_delta_pct"] = 100 * (probe["loss"] - dense_eval["loss"]) / dense_eval["loss"]
    data = {"source": "Python stdlib .py files (no tests)", "files": files, "train_bytes": train_data.numel(), "valid_bytes": valid_data.numel()}
    return {"runs": runs, "content_aware_on_dense_model": on_dense, "data": data}


def _plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, run in report["runs"].items():
        axis.plot(run["curve"]["step"], run["curve"]["loss"], label=f"{name}: valid {run['valid_loss']:.3f} ({run['valid_loss_delta_pct']:+.2f}%)")
    axis.set(xlabel="step", ylabel="train loss (nats/byte)", title=f"sparse vs dense training, {report['device']}")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--steps", type=int, help="override the preset's steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON (and PNG) file")
    args = parser.parse_args()
    config = PRESETS[args.preset] if args.steps is None else dataclasses.replace(PRESETS[args.preset], steps=args.steps)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # as quality.py: one core, comparable across machines
    result = compare(config, seed=args.seed, device=device)
    date = datetime.date.today().isoformat()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"schema": 1, "benchmark": "sparse-train", "device": name, "torch": torch.__version__, "date": date,
              "command": "PYTHONPATH=src python " + " ".join(sys.argv), "preset": args.preset, "config": dataclasses.asdict(config),
              "precision": "bf16 autocast" if device.type == "cuda" else "float32", **result}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"sparse-train-{name.replace(' ', '-').lower()}-{date}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    plotted = _plot(report, args.out / f"{stem}.png")
    print(json.dumps(report["content_aware_on_dense_model"]))
    print(f"wrote {args.out / stem}.json" + (" and .png" if plotted else ""))


if __name__ == "__main__":
    main()
