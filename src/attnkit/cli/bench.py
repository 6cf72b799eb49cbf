"""`attnkit bench attention`: TFLOP/s of every attention backend and of auto, as a table and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from attnkit.bench.attention import AttentionBench, BenchRecord, bench_attention, default_grid
from attnkit.cli._inputs import check_inputs
from attnkit.errors import check_arg
from attnkit.utils.dtypes import parse_dtype


def render(report: AttentionBench) -> Table:
    """One row per shape, one TFLOP/s column per backend that ran, then auto's pick and the 2% check.

    Skipped measurements show as "-"; their reasons are in the JSON.
    """
    backends = list(dict.fromkeys(r.backend for r in report.records if r.backend != "auto" and r.tflops is not None))
    table = Table(title=f"attention TFLOP/s · {report.device} · torch {report.torch} · {report.dtype}", caption=report.flops_convention)
    for column in ("shape", "B×H", *backends, "auto (pick)", "best", "≤2%"):
        table.add_column(column, justify="left" if column == "shape" else "right")
    for summary in report.summaries:
        shape = summary.shape
        cells = {r.backend: r for r in report.records if r.shape == shape}
        row = [shape.label, f"{shape.batch}×{shape.heads}"]
        row += [_cell(cells.get(name)) for name in backends]
        auto = cells.get("auto")
        row.append(f"{_cell(auto)} ({summary.auto_chosen})" if auto else "-")
        row.append(summary.best or "-")
        ok = summary.auto_within_tolerance
        row.append("-" if ok is None else "[green]yes[/]" if ok else "[red]no[/]")
        table.add_row(*row)
    return table


def _cell(record: BenchRecord | None) -> str:
    if record is None:
        return "-"
    return "-" if record.tflops is None else f"{record.tflops:.3g}"


def attention_command(
    json_path: Path = typer.Option(None, "--json", help="Write the records here."),
    quick: bool = typer.Option(False, "--quick", help="A tiny grid (tiny shapes on CPU)."),
    device: str = typer.Option(None, help="cuda or cpu; default cuda when available."),
    backends: str = typer.Option(None, help="Comma-separated backend names; default all."),
    dtype: str = typer.Option("bf16", help="bf16, fp16 or fp32."),
    repeats: int = typer.Option(10, help="Timed calls per measurement (median reported)."),
    budget_s: float = typer.Option(None, "--budget-s", help="Stop starting measurements after this many seconds."),
) -> None:
    """Time every attention backend and auto over a grid of shapes (TFLOP/s)."""
    torch_dtype = parse_dtype(dtype, "--dtype")
    check_arg(budget_s is None or budget_s > 0, "--budget-s", "a number of seconds > 0", budget_s)
    check_inputs(repeats=repeats, device=device, backends=backends, outputs={"--json": json_path})
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    console = Console(stderr=True)
    grid = default_grid(quick=quick, device=device)
    names = tuple(backends.split(",")) if backends else None
    with console.status("benchmarking") as status:

        def progress(record: BenchRecord) -> None:
            status.update(f"{record.backend} {record.shape.label}: {_cell(record)}")

        report = bench_attention(
            grid=grid, backends=names, device=device, dtype=torch_dtype, repeats=repeats, budget_s=budget_s, progress=progress
        )
    Console().print(render(report))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report.to_json(), indent=1))
        console.print(f"wrote {json_path}")


def register(app: typer.Typer) -> None:
    """Add ``attnkit bench attention`` to `app`."""
    bench = typer.Typer(help="Benchmarks.", no_args_is_help=True)
    bench.command("attention")(attention_command)
    app.add_typer(bench, name="bench")
