"""`attnkit analyze MODEL`: FLOPs, bytes, kernels and predicted time per execution mode, every attention."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console


_PROBE_SEQ = 32
"""Sequence length of the real-valued build that mask values are read on (see ``analyze(probe=...)``)."""


def register(app: typer.Typer) -> None:
    """Add this subcommand to `app`."""

    @app.command("analyze")
    def analyze_command(
        model: str = typer.Argument(..., help="Zoo name (vit_b_16, bert-base, gpt2, ...) or package.module:function."),
        hardware: str = typer.Option(
            "h100", "--hardware",
            help="h100, h200, a100, l4, cpu (a fixed 16-core AVX-512 server, not this machine), this (this "
                 "machine's GPU, else its CPU: measured on first use, then cached), or a calibrate JSON file."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="Analysis dtype: fp32, bf16, fp16 (default: the model's)."),
        batch: int = typer.Option(1, "--batch", help="Batch size of the example inputs."),
        seq: Optional[int] = typer.Option(None, "--seq", help="Sequence length (text models)."),
        json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON (versioned schema)."),
        markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write the report as Markdown."),
        html_path: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML page with a roofline plot."),
        measured: Optional[Path] = typer.Option(None, "--measured", help="Profile JSON (attnkit profile --json) to show beside."),
    ) -> None:
        """Capture MODEL, find its attention, partition it per mode and predict time on --hardware."""
        from attnkit.cli._inputs import check_inputs

        check_inputs(models=model, batch=batch, seq=seq, hardware=hardware, measured=measured,
                     outputs={"--json": json_path, "--markdown": markdown, "--html": html_path})

        from attnkit.analyze import StepProgress, analyze, render_report, to_html
        from attnkit.measure import load_hardware, load_measured
        from attnkit.models import build_model, default_seq_len

        profile = load_hardware(hardware)  # argument errors before the slow model build
        from attnkit.utils import parse_dtype

        analysis_dtype = parse_dtype(dtype, "--dtype") if dtype else None
        seen = load_measured(measured, model, batch) if measured else None
        progress = StepProgress()
        with progress.step(f"building {model} (batch {batch}, shapes only)"):
            zoo = build_model(model, batch_size=batch, seq_len=seq, device="meta")  # no data: any --seq is cheap
        # Mask values (causality of a materialised mask, padding) come from a real build at a short length.
        length = seq or default_seq_len(model)
        probe_seq = min(length, _PROBE_SEQ) if length else None

        def probe():
            small = build_model(model, batch_size=batch, seq_len=probe_seq)
            return small.model, small.example_inputs, small.example_kwargs

        report = analyze(zoo.model, zoo.example_inputs, zoo.example_kwargs, hardware=profile, dtype=analysis_dtype,
                         name=model, measured=seen, progress=progress.step, probe=probe)
        render_report(report, Console())
        for path, text in ((json_path, lambda: json.dumps(report.to_json(), indent=1)),
                           (markdown, report.to_markdown), (html_path, lambda: to_html(report))):
            if path is not None:
                path.write_text(text())
                progress.console.print(f"wrote {path}")
