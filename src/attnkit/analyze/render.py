"""Terminal output for ``attnkit analyze``: a rich summary of a report and a step progress display."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console, Group
from rich.panel import Panel

from attnkit.analyze.report import AnalysisReport
from attnkit.utils.tables import rich_table

__all__ = ["render_report", "StepProgress"]


class StepProgress:
    """A spinner per long step (capture, profiling) that leaves a ``done in N s`` line behind.

    Pass ``progress.step`` as ``analyze(..., progress=...)``.
    """

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        start = time.perf_counter()
        with self.console.status(f"{description}..."):
            yield
        self.console.print(f"[dim]{description}: done in {time.perf_counter() - start:.1f} s[/dim]")


def render_report(report: AnalysisReport, console: Console | None = None, *, top: int = 10) -> None:
    """Print the summary: the header, then ``report.tables(top)`` (modes, savings, attention, steps, top kernels)."""
    console = console or Console()
    first, *rest = report.header_lines()
    header = "\n".join([f"[bold]{first}[/bold]", *rest[:-1], f"[dim]{rest[-1]}[/dim]"])
    console.print(Panel(header, title="attnkit analyze", expand=False))
    console.print(Group(*(rich_table(*table) for table in report.tables(top))))
    for note in report.notes:
        console.print(f"[dim]note: {note}[/dim]")
