"""`attnkit validate MODEL`: prove a model's attention is correct and fast; exit 1 when accuracy fails or nothing was found."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from attnkit.cli._inputs import check_inputs


def register(app: typer.Typer) -> None:
    """Add this subcommand to `app`."""

    @app.command("validate")
    def validate_command(
        model: str = typer.Argument(..., help="Zoo name (vit_b_16, bert-base, llama-gqa, ...) or package.module:function."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)."),
        batch: Optional[int] = typer.Option(None, "--batch", help="Batch size of the example inputs."),
        seq: Optional[int] = typer.Option(None, "--seq", help="Sequence length of the example inputs (text models)."),
        json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON to this file."),
        plots: Optional[Path] = typer.Option(None, "--plots", help="Write PNG plots (latency, memory, accuracy) to this directory."),
        quick: bool = typer.Option(False, "--quick", help="Quick preset: model shapes only, no compile (seconds on CPU)."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the accuracy inputs (default: fresh each run)."),
        device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available)."),
        backends: Optional[str] = typer.Option(None, "--backends", help="Comma-separated backends to test (default: all but reference)."),
        repeats: Optional[int] = typer.Option(None, "--repeats", help="Timed calls per measurement (default: the preset's)."),
    ) -> None:
        """Check backends, accuracy (fwd + grads vs float64), speed, compile and AMP; exit 1 if accuracy
        fails or no attention was found to validate."""
        from attnkit.validate import ValidateConfig, render, save_plots, validate

        check_inputs(models=model, batch=batch, seq=seq, repeats=repeats, device=device, backends=backends,
                     outputs={"--json": json_path}, output_dirs={"--plots": plots})
        console = Console(stderr=True)
        names = tuple(name.strip() for name in backends.split(",")) if backends else None
        overrides = {"repeats": repeats} if repeats is not None else {}
        config = ValidateConfig.preset("quick" if quick else "default", seed=seed, backends=names, **overrides)
        with console.status("validating") as status:
            report = validate(model, dtype=dtype, batch_size=batch, seq_len=seq, device=device, config=config, progress=status.update)
        render(report, Console())
        if json_path is not None:
            console.print(f"report: {report.save(json_path)}")
        if plots is not None:
            for path in save_plots(report, plots):
                console.print(f"plot: {path}")
        raise typer.Exit(0 if report.passed else 1)
