"""The rich terminal view of a `ValidationReport` (its tables come from ``ValidationReport.tables()``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console

from attnkit.utils.tables import rich_table

if TYPE_CHECKING:
    from attnkit.validate.report import ValidationReport

__all__ = ["render", "markdown"]

_STATUS_STYLE = {"pass": "green", "ok": "green", "fail": "bold red", "error": "red", "skip": "yellow"}


def render(report: ValidationReport, console: Console | None = None) -> None:
    """Print the report as rich tables, recommendations and the verdict."""
    console = console or Console()
    console.rule(f"attnkit validate {report.model} ({report.dtype}, {report.device})")
    for table in report.tables():
        console.print(rich_table(*table, cell=_styled))
    for stage, reason in report.skipped.items():
        console.print(f"[yellow]skipped {stage}[/]: {reason}")
    for rec in report.recommendations:
        console.print(f"[bold]{rec.kind}[/] {rec.text}")
    console.print(f"[{'green' if report.passed else 'bold red'}]{report.summary}[/]")


def _styled(cell: str) -> str:
    return f"[{_STATUS_STYLE[cell]}]{cell}[/]" if cell in _STATUS_STYLE else cell


def markdown(report: ValidationReport) -> str:
    """The report as Markdown (tables, recommendations, verdict): ``report.to_markdown()``."""
    return report.to_markdown()
