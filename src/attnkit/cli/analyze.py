"""`attnkit analyze MODEL`: FLOPs, bytes, kernels and predicted time per execution mode, every attention."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    """Add this subcommand to `app`."""

    @app.command("analyze")
    def analyze_command(
        model: str = typer.Argument(..., help="Zoo name (vit_b_16, bert-base, gpt2, ...) or package.module:function."),
        hardware: str = typer.Option("h100", "--hardware", help="h100, h200, a100, l4, cpu, or a calibrate JSON file."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="Analysis dtype: fp32, bf16, fp16 (default: the model's)."),
        batch: int = typer.Option(1, "--batch", min=1, help="Batch size of the example inputs."),
        seq: Optional[int] = typer.Option(None, "--seq", min=1, help="Sequence length (text models)."),
        json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON (versioned schema)."),
        markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write the report as Markdown."),
        html_path: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML page with a roofline plot."),
        measured: Optional[Path] = typer.Option(None, "--measured", help="Profile JSON (attnkit profile --json) to show beside."),
    ) -> None:
        """Capture MODEL, find its attention, partition it per mode and predict time on --hardware."""
        from attnkit.graph import analyze, load_hardware, load_measured, parse_dtype, render_report, to_html
        from attnkit.graph.render import StepProgress
        from attnkit.models import build_model

        profile = load_hardware(hardware)  # argument errors before the slow model build
        analysis_dtype = parse_dtype(dtype) if dtype else None
        seen = load_measured(measured, model, batch) if measured else None
        progress = StepProgress()
        with progress.step(f"building {model} (batch {batch})"):
            zoo = build_model(model, batch_size=batch, seq_len=seq)
        report = analyze(zoo.model, zoo.example_inputs, zoo.example_kwargs, hardware=profile, dtype=analysis_dtype,
                         name=model, measured=seen, progress=progress.step)
        render_report(report, Console())
        for path, text in ((json_path, lambda: json.dumps(report.to_json(), indent=1)),
                           (markdown, report.to_markdown), (html_path, lambda: to_html(report))):
            if path is not None:
                path.write_text(text())
                progress.console.print(f"wrote {path}")
