"""`attnkit calibrate`: measure this GPU's or CPU's rates, bandwidths and dispatch costs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    """Add this subcommand to `app`."""

    @app.command("calibrate")
    def calibrate_command(
        out: Path = typer.Option(Path("hardware-profile.json"), "--out", help="Where to save the profile JSON."),
        device: Optional[str] = typer.Option(
            None, "--device",
            help="cuda (the current GPU, a few minutes) or cpu (this CPU at torch's thread count, under a minute); "
                 "default: cuda when visible, else cpu."),
    ) -> None:
        """Measure a hardware profile on the current GPU or CPU; use it with `attnkit analyze --hardware FILE`
        (`--hardware this` calibrates and caches it by itself)."""
        from attnkit.cli._inputs import check_inputs

        check_inputs(outputs={"--out": out})

        from attnkit.errors import check_arg
        from attnkit.measure import calibrate

        check_arg(device in (None, "cpu", "cuda"), "--device", "'cpu' or 'cuda'", device)
        console = Console(stderr=True)
        with console.status("calibrating") as status:
            profile = calibrate(log=status.update, device=device)
        out.write_text(json.dumps(profile.to_json(), indent=1))
        Console().print(profile)
        console.print(f"wrote {out}")
