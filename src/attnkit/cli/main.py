"""The `attnkit` command. Each subcommand lives in its own module with a ``register(app)``.

Exit codes: 0 done (``validate``: passed), 1 a failed verdict or an internal error, 2 a bad
input (one line naming the option, no traceback). ``attnkit --debug ...`` shows the traceback.
"""

from __future__ import annotations

import importlib

import typer
from typer.core import TyperGroup

from attnkit.cli._inputs import cli_message
from attnkit.errors import AttnkitError

try:
    from typer import TyperException as _UsageErrors  # typer releases that vendor click
except ImportError:
    from click import ClickException as _UsageErrors

_PASS_THROUGH = (typer.Exit, typer.Abort, _UsageErrors, BrokenPipeError)
"""Exits, aborts and typer's own usage errors (exit 2 with usage help) keep their handling."""


class _Group(TyperGroup):
    """Runs a subcommand; user mistakes become one line and exit 2, bugs one line and exit 1."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except AttnkitError as error:
            if ctx.params.get("debug"):
                raise
            typer.secho(f"error: {cli_message(error)}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        except Exception as error:
            if ctx.params.get("debug"):
                raise
            text = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            typer.secho(f"internal error: {text} (rerun with attnkit --debug ... for the traceback)", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    name="attnkit",
    cls=_Group,
    help="See, speed up, scale and prove the attention in PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", envvar="ATTNKIT_DEBUG", help="Show the full traceback of any error."),
) -> None:
    """See, speed up, scale and prove the attention in PyTorch models."""


# Order is the order in `attnkit --help`.
_COMMAND_MODULES = ("analyze", "profile", "calibrate", "optimize", "validate", "bench", "fp8", "sparse", "doctor")
for _name in _COMMAND_MODULES:
    importlib.import_module(f"attnkit.cli.{_name}").register(app)


def main() -> None:
    """Entry point (``attnkit`` and ``python -m attnkit``)."""
    app()
