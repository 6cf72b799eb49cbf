"""`attnkit optimize MODEL`: rewrite the model's attention, prove it equivalent, time it, print the report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this subcommand to `app`."""

    @app.command("optimize")
    def optimize_command(
        model: str = typer.Argument(..., help="Zoo name (vit_b_16, bert-base, gpt2, llama-gqa, t5-small, ...) or package.module:function."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="Run the optimized model in fp32, bf16 or fp16 (default: the model's)."),
        batch: int = typer.Option(1, "--batch", help="Batch size of the example inputs."),
        seq: Optional[int] = typer.Option(None, "--seq", help="Sequence length (text models)."),
        compile_model: bool = typer.Option(False, "--compile", help="torch.compile the optimized model (the report says so)."),
        compile_modes: Optional[list[str]] = typer.Option(
            None, "--compile-mode", help="torch.compile mode for --compile (default, reduce-overhead, max-autotune-no-cudagraphs, max-autotune); "
            "repeat it with --select to race several modes. Implies --compile.",
        ),
        backend: str = typer.Option("auto", "--backend", help="attnkit.ops backend for every rewritten attention."),
        device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available)."),
        check: bool = typer.Option(True, "--check/--no-check", help="Compare outputs and gradients with the original."),
        select: Optional[bool] = typer.Option(
            None, "--select/--no-select", help="Time original vs rewritten (and both compiled with --compile); keep the fastest proven one (default: on for cuda)."
        ),
        fp8: Optional[str] = typer.Option(
            None, "--fp8", help="Also build an FP8 inference variant with this recipe (tensorwise, rowwise, rowwise_with_gw_hp, blockwise, "
            "delayed) and report its accuracy and speed next to the exact result; approximate, so never picked, never saved. Needs CUDA sm89+.",
        ),
        json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
        save: Optional[Path] = typer.Option(
            None, "--save", help="Save the optimized model to this directory (original weight names; reload with attnkit.optimize.load_optimized)."
        ),
    ) -> None:
        """Rewrite MODEL's attention for speed, check it against the original, print the report (and save the model)."""
        from attnkit.cli._inputs import check_inputs

        check_inputs(models=model, batch=batch, seq=seq, device=device, backend=backend, outputs={"--json": json_path}, output_dirs={"--save": save})
        from attnkit.errors import check_arg
        from attnkit.optimize.config import COMPILE_MODES, FP8_RECIPES

        for mode in compile_modes or ():
            check_arg(mode in COMPILE_MODES, "--compile-mode", f"one of {', '.join(COMPILE_MODES)}", mode)
        check_arg(fp8 is None or fp8 in FP8_RECIPES, "--fp8", f"one of {', '.join(FP8_RECIPES)}", fp8)

        import torch
        from rich.console import Console

        from attnkit.models import build_model
        from attnkit.optimize import OptimizeConfig, optimize

        console = Console()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        select = device.startswith("cuda") if select is None else select
        modes = tuple(compile_modes or (("default",) if compile_model else ()))
        check_arg(len(modes) <= 1 or select, "--compile-mode", "one mode, or several together with --select", f"{len(modes)} modes without --select")
        compile_arg = "none" if not modes else modes[0] if len(modes) == 1 and not select else modes
        config = OptimizeConfig(dtype=dtype, backend=backend, compile=compile_arg, check=check, select=select, fp8=fp8)
        with console.status(f"building {model} (batch {batch}) on {device}"):
            zoo = build_model(model, batch_size=batch, seq_len=seq, device=device)
        with console.status("rewriting, checking equivalence" + (", timing" if device.startswith("cuda") or select else "")):
            optimized, report = optimize(zoo.model, zoo.example_inputs, example_kwargs=zoo.example_kwargs, config=config)
        report.model = model
        console.print(report)
        if json_path is not None:
            json_path.write_text(report.dumps())
            console.print(f"wrote {json_path}")
        if save is not None:
            from attnkit.optimize.save import save_optimized

            with console.status(f"saving to {save}"):
                save_optimized(optimized, report, save)
            console.print(f"saved to {save} (reload: attnkit.optimize.load_optimized({str(save)!r}{'' if hasattr(optimized, 'save_pretrained') else ', model'}))")
        if not report.passed:
            raise typer.Exit(1)
        fused = report.fusion is not None and bool(report.fusion.groups)
        if report.rewritten == 0 and not fused:
            # Exit 0 would read as "optimized" to a script; say plainly that the model is unchanged.
            typer.secho(f"nothing rewritten in {model}: no attention or projections attnkit can rewrite "
                        "(the 'skipped' table says why for each module)", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(1)
