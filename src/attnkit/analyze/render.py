"""Terminal output for ``attnkit analyze``: a rich summary of a report and a step progress display."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table

from attnkit.analyze.report import AnalysisReport

__all__ = ["render_report", "StepProgress"]


class StepProgress:
    """A spinner per long step (capture, profiling) that leaves a ``done in N s`` line behind.

    Pass ``progress.step`` as ``analyze(..., progress=...)``.
    """

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        start = time.perf_counter()
        with self.console.status(f"{description}..."):
            yield
        self.console.print(f"[dim]{description}: done in {time.perf_counter() - start:.1f} s[/dim]")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _modes_table(report: AnalysisReport) -> Table:
    table = Table(title="Totals per mode", title_justify="left")
    for column in ("mode", "kernels", "GB moved", "pred. ms", "limited by", "meas. kernels", "meas. ms"):
        table.add_column(column, justify="left" if column in ("mode", "limited by") else "right")
    for m in report.modes:
        got = report.measured.get(m.mode, {})
        latency = got.get("latency_ms")
        table.add_row(m.mode, str(m.num_kernels), f"{m.total_bytes / 1e9:.3f}", _ms(m.predicted_s), m.limiter,
                      str(got.get("kernels", "")), "" if latency is None else f"{latency:.3f}")
    return table


def _savings_table(report: AnalysisReport) -> Table:
    table = Table(title="What each fusion saves", title_justify="left")
    for column in ("step", "mode", "kernels", "MB", "ms"):
        table.add_column(column, justify="left" if column in ("step", "mode") else "right")
    for s in report.savings:
        table.add_row(s.step, s.mode, str(s.kernels_saved), f"{s.bytes_saved / 1e6:.1f}", _ms(s.time_saved_s))
    return table


def _top_table(report: AnalysisReport, count: int) -> Table:
    mode = report.modes[-1].mode
    table = Table(title=f"Top kernels by predicted time ({mode})", title_justify="left")
    for column in ("kernel", "layer", "GFLOP", "MB", "FLOP/B", "bound", "ms"):
        table.add_column(column, justify="left" if column in ("kernel", "layer", "bound") else "right", overflow="fold")
    for k in report.top_kernels(mode, count):
        table.add_row(k.name, k.layer, f"{k.flops / 1e9:.3f}", f"{k.bytes / 1e6:.2f}", f"{k.intensity:.1f}",
                      k.bound, _ms(k.time_s))
    return table


def _attention_table(report: AnalysisReport) -> Table:
    table = Table(title=f"Attention ({len(report.attention)} sites)", title_justify="left")
    for column in ("name", "kind", "shape B H(kv) Sq Skv D", "mask", "QKV", "GFLOP", "bound", "ms"):
        table.add_column(column, overflow="fold", justify="right" if column in ("GFLOP", "ms") else "left")
    for a in report.attention:
        heads = f"{a.num_heads}" if a.num_kv_heads == a.num_heads else f"{a.num_heads}({a.num_kv_heads})"
        shape = f"{a.batch} {heads} {a.seq_q} {a.seq_kv} {a.head_dim_qk}"
        table.add_row(a.name or "<root>", f"{a.kind}, causal" if a.causal else a.kind, shape, a.mask, a.qkv_layout,
                      f"{a.flops / 1e9:.3f}", a.bound, _ms(a.time_s))
    return table


def _steps_table(report: AnalysisReport) -> Table:
    table = Table(title="Attention in primitive steps, and the attention-aware kernel that fuses them", title_justify="left")
    for column in ("name", "steps", "fused into"):
        table.add_column(column, overflow="fold")
    for a in report.attention:
        table.add_row(a.name or "<root>", " -> ".join(a.steps), a.fused_kernel)
    return table


def render_report(report: AnalysisReport, console: Console | None = None, *, top: int = 10) -> None:
    """Print the summary: model, totals per mode, fusion savings, top kernels, every attention."""
    console = console or Console()
    hardware = report.hardware
    header = (
        f"[bold]{report.model}[/bold] on {hardware.get('name')} ({hardware.get('source')}), dtype {report.dtype}\n"
        f"{report.total_flops / 1e9:.2f} GFLOP per forward ({report.dense_flops / 1e9:.2f} with attention non-causal), "
        f"{report.num_nodes} ATen nodes, {len(report.attention)} attention sites\n"
        f"[dim]FLOPs: {report.flop_convention}[/dim]"
    )
    console.print(Panel(header, title="attnkit analyze", expand=False))
    console.print(Group(_modes_table(report), _savings_table(report), _top_table(report, top), _attention_table(report),
                        _steps_table(report)))
    for note in report.notes:
        console.print(f"[dim]note: {note}[/dim]")
