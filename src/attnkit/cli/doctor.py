"""`attnkit doctor`: versions, GPUs and which attention kernels actually run here."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from attnkit.doctor import DoctorReport, diagnose


def register(app: typer.Typer) -> None:
    """Add this subcommand to `app`."""

    @app.command()
    def doctor(as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
        """Probe this machine: torch/CUDA, GPUs, SDPA backends, FlexAttention, FP8 GEMM, distributed, packages."""
        if as_json:
            typer.echo(json.dumps(diagnose().to_json(), indent=2))
            return
        console = Console()
        with console.status("probing kernels and packages..."):
            report = diagnose()
        console.print(_environment_table(report))
        console.print(_checks_table(report))


def _environment_table(report: DoctorReport) -> Table:
    table = Table(title="attnkit doctor", show_header=False)
    rows = {
        "python": report.python,
        "platform": report.platform,
        "torch": report.torch,
        "CUDA": report.cuda or "none (CPU build)",
        "cuDNN": report.cudnn or "none",
    }
    for gpu in report.gpus:
        rows[f"GPU {gpu.index}"] = f"{gpu.name}, compute capability {gpu.capability}, {gpu.memory_gib} GiB"
    if not report.gpus:
        rows["GPU"] = "none found"
    for key, value in rows.items():
        table.add_row(key, value)
    return table


def _checks_table(report: DoctorReport) -> Table:
    table = Table("group", "check", "runs", "detail")
    for check in report.checks:
        runs = "[green]yes[/green]" if check.ok else "[red]no[/red]"
        table.add_row(check.group, check.name, runs, check.detail)
    return table
