"""`attnkit profile MODEL...`: measured vs predicted kernels and latency on the current GPU."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table


def register(app: typer.Typer) -> None:
    """Add this subcommand to `app`."""

    @app.command("profile")
    def profile_command(
        models: List[str] = typer.Argument(..., help="Zoo names or package.module:function."),
        batch: List[int] = typer.Option([1, 64], "--batch", help="Batch sizes (repeat the option)."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="Model and analysis dtype (default: bf16 on a GPU, fp32 on CPU)."),
        hardware: Optional[str] = typer.Option(
            None, "--hardware",
            help="Profile for the predictions, or a calibrate JSON (default: h100 on a GPU; without one the models run "
                 "on this CPU and `this`, its measured profile, is the default)."),
        eager_only: bool = typer.Option(False, "--eager-only", help="Skip torch.compile."),
        json_path: Optional[Path] = typer.Option(None, "--json", help="Write the records as JSON."),
    ) -> None:
        """Count CUDA kernels and time forwards (eager, torch.compile) and compare with the predictions
        (without a GPU: eager latency on this CPU)."""
        from attnkit.cli._inputs import check_inputs

        check_inputs(models=models, batch=batch, hardware=hardware, outputs={"--json": json_path})

        import torch

        from attnkit.measure import profile_models
        from attnkit.utils import parse_dtype

        gpu = torch.cuda.is_available()
        dtype = dtype or ("bf16" if gpu else "fp32")
        hardware = hardware or ("h100" if gpu else "this")
        eager_only = eager_only or not gpu  # torch.compile on CPU needs a C++ toolchain and is not what the profile models
        console = Console(stderr=True)
        with console.status("profiling") as status:
            result = profile_models(models, batches=batch, dtype=parse_dtype(dtype, "--dtype"), hardware=hardware,
                                    modes=("eager",) if eager_only else ("eager", "compiled"), log=status.update)
        table = Table(title=f"{result.device}, torch {result.torch}")
        for column in ("model", "batch", "mode", "pred. kernels", "meas. kernels", "pred. ms", "meas. ms", "note"):
            table.add_column(column)
        for r in result.records:
            table.add_row(r.model, str(r.batch), r.mode, str(r.predicted_kernels), _num(r.measured_kernels, 0),
                          _num(r.predicted_ms, 3), _num(r.measured_ms, 3), r.note)
        Console().print(table)
        if json_path is not None:
            record = result.to_json()
            record["command"] = record.get("command") or "attnkit " + shlex.join(sys.argv[1:])  # results carry their command
            json_path.write_text(json.dumps(record, indent=1))
            console.print(f"wrote {json_path}")


def _num(value: Optional[float], digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"
