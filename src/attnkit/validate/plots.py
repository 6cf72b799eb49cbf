"""PNG plots of a `ValidationReport` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from attnkit.validate.report import ValidationReport

__all__ = ["save_plots"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _sweep_plot(plt, report: ValidationReport, field: str, ylabel: str, path: Path) -> Path | None:
    """One panel per batch size: ``field`` vs sequence length, a line per backend (first layer group)."""
    layer = report.layers[0].layer.names[0] if report.layers else None
    rows = [r for r in report.performance if r.scope == "layer" and r.layer == layer and getattr(r, field) is not None]
    batches = sorted({r.batch for r in rows})
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for backend in sorted({r.backend for r in rows}):
            points = sorted((r.seq, getattr(r, field)) for r in rows if r.batch == batch and r.backend == backend)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=backend)
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=ylabel, title=f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    clock = rows[0].clock
    fig.suptitle(f"{report.model} {report.dtype} on {report.environment.device_name if report.environment else report.device} ({clock}), layer {layer}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _accuracy_plot(plt, report: ValidationReport, path: Path) -> Path | None:
    """Worst error ratio (vs the math backend) per backend, on a log axis, with the pass line."""
    worst: dict[str, tuple[float, bool]] = {}
    for r in report.accuracy:
        if r.worst_ratio is not None:
            ratio, ok = worst.get(r.backend, (0.0, True))
            worst[r.backend] = (max(ratio, min(r.worst_ratio, 1e6)), ok and r.status == "pass")
    if not worst:
        return None
    names = list(worst)
    fig, ax = plt.subplots(figsize=(max(5, len(names) * 0.9), 4))
    ax.bar(names, [max(worst[n][0], 1e-3) for n in names], color=["tab:green" if worst[n][1] else "tab:red" for n in names])
    ax.axhline(report.config.get("tolerance_factor", 2.0), color="black", linestyle="--", label="pass limit (k x math error, before the floor)")
    ax.set(yscale="log", ylabel="worst error / math-backend error", title=f"{report.model} {report.dtype}: error vs float64")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_plots(report: ValidationReport, directory: str | Path) -> list[Path]:
    """Write ``latency.png``, ``memory.png`` (GPU only) and ``accuracy.png`` under ``directory``.

    Returns the paths written (plots without data are left out). Needs matplotlib (``pip install attnkit[plots]``).
    """
    plt = _pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{report.model}-{report.dtype}".replace("/", "_").replace(":", "_")
    written = [
        _sweep_plot(plt, report, "median_ms", "median latency (ms)", directory / f"{stem}-latency.png"),
        _sweep_plot(plt, report, "peak_mem_mb", "peak memory (MiB)", directory / f"{stem}-memory.png"),
        _accuracy_plot(plt, report, directory / f"{stem}-accuracy.png"),
    ]
    return [path for path in written if path is not None]
