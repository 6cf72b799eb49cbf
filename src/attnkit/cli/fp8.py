"""`attnkit fp8 MODEL`: which GEMM layers FP8 training would convert, why the others stay, and the predicted speed-up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

_HARDWARE = ("h100", "h200")
"""GPUs with FP8 tensor cores that the measured speed table describes (Hopper)."""
_VIT_TOKENS = 197
"""Tokens of the zoo's ViTs: 224x224 images in 16x16 patches plus the class token (models/vision.py)."""


def _rows(report) -> list[tuple[str, ...]]:
    rows = []
    for layer in report.layers:
        speedup = "-" if layer.speedup is None else f"{layer.speedup:.2f}x"
        verdict = "fp8" if layer.converted else f"bf16: {layer.reason}"
        rows.append((layer.name, f"{layer.m}x{layer.k}x{layer.n}", speedup, verdict))
    return rows


def register(app: typer.Typer) -> None:
    """Add this subcommand to `app`."""

    @app.command("fp8")
    def fp8_command(
        model: str = typer.Argument(..., help="Zoo name (llama-gqa, bert-base, ...) or package.module:function."),
        recipe: str = typer.Option("tensorwise", "--recipe", help="tensorwise, rowwise, rowwise_with_gw_hp, blockwise, delayed."),
        hardware: str = typer.Option("h100", "--hardware", help="h100 or h200 (GPUs with FP8 tensor cores)."),
        batch: int = typer.Option(1, "--batch", help="Batch size; tokens per step M = batch x sequence."),
        seq: Optional[int] = typer.Option(None, "--seq", help="Sequence length (text models; default: the model's)."),
        json_path: Optional[Path] = typer.Option(None, "--json", help="Write the plan as JSON."),
    ) -> None:
        """Plan FP8 training for MODEL: per layer converted or kept (and why), measured speed-up, shares converted."""
        from attnkit.cli._inputs import check_inputs
        from attnkit.errors import check_arg
        from attnkit.fp8 import Recipe

        check_inputs(models=model, batch=batch, seq=seq, outputs={"--json": json_path})
        recipes = [r.value for r in Recipe]
        check_arg(recipe in recipes, "--recipe", f"one of {recipes}", recipe)
        check_arg(hardware in _HARDWARE, "--hardware", f"one of {list(_HARDWARE)} (the measured FP8 table is Hopper's)", hardware)

        from rich.console import Console
        from rich.table import Table

        from attnkit.fp8.report import float8_report
        from attnkit.models import build_model

        console = Console()
        with console.status(f"building {model} (shapes only)"):
            zoo = build_model(model, batch_size=batch, seq_len=seq, device="meta")
        tokens = _tokens(zoo, batch)
        check_arg(tokens >= 16, "--batch", "batch x sequence >= 16 tokens (FP8 GEMMs need 16-aligned shapes)", tokens)
        report = float8_report(zoo.model, tokens=tokens, recipe=recipe, hardware=hardware, name=model)

        table = Table(title=f"FP8 plan: {model}, recipe {recipe}, M = {tokens} tokens, {hardware}")
        for header in ("layer", "M x K x N", "table speed-up", "decision"):
            table.add_column(header, overflow="fold")
        for row in _rows(report):
            table.add_row(*row)
        console.print(table)
        console.print(f"converted: {report.param_share:.1%} of GEMM parameters, {report.flop_share:.1%} of GEMM FLOPs; "
                      f"predicted speed-up of these GEMMs (fwd+bwd, compiled): {report.speedup:.2f}x")
        console.print(f"speed-ups measured on {report.table_device} (attnkit/fp8/speedup_table.json); "
                      "attention, norms and the optimizer are not included")
        if json_path is not None:
            json_path.write_text(json.dumps(report.to_json(), indent=1))
            console.print(f"wrote {json_path}")


def _tokens(zoo, batch: int) -> int:
    """Tokens per step M: batch x sequence, read from the first example input."""
    if zoo.family == "vit":
        return batch * _VIT_TOKENS
    first = zoo.example_inputs[0]  # ids (B, S) or embeddings (B, S, E)
    return first.shape[:2].numel() if first.dim() >= 2 else first.numel()
