"""The `attnkit` command. Each subcommand lives in its own module with a ``register(app)``."""

from __future__ import annotations

import importlib

import typer

from attnkit.errors import AttnkitError

app = typer.Typer(
    name="attnkit",
    help="See, speed up, scale and prove the attention in PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Order is the order in `attnkit --help`.
_COMMAND_MODULES = ("analyze", "profile", "calibrate", "optimize", "validate", "bench", "doctor")
for _name in _COMMAND_MODULES:
    importlib.import_module(f"attnkit.cli.{_name}").register(app)


def main() -> None:
    """Entry point: user mistakes print one clear line and exit 2, never a stack trace."""
    try:
        app()
    except AttnkitError as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
