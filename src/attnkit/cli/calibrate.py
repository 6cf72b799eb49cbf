"""`attnkit calibrate`: measure this GPU's matmul rate, copy bandwidth and launch overhead."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    """Add this subcommand to `app`."""

    @app.command("calibrate")
    def calibrate_command(
        out: Path = typer.Option(Path("hardware-profile.json"), "--out", help="Where to save the profile JSON."),
    ) -> None:
        """Measure a hardware profile on the current GPU; use it with `attnkit analyze --hardware FILE`."""
        from attnkit.graph import calibrate

        console = Console(stderr=True)
        with console.status("calibrating") as status:
            profile = calibrate(log=status.update)
        out.write_text(json.dumps(profile.to_json(), indent=1))
        Console().print(profile)
        console.print(f"wrote {out}")
