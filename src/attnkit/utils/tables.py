"""The one table renderer: ``(title, header, rows)`` tables -> terminal (rich), Markdown and HTML.

Reports (``AnalysisReport.tables()``, ``ValidationReport.tables()``) build their tables once as plain
strings; these functions only lay them out. Columns whose every non-empty cell is a number are right-aligned.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence

__all__ = ["Table", "numeric_columns", "markdown_table", "html_table", "rich_table"]

Table = tuple[str, Sequence[str], Sequence[Sequence[str]]]
"""``(title, header, rows)``: every cell a display string."""

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def numeric_columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[bool]:
    """Per column: True when it has a value and every non-empty cell is a number."""
    return [
        any(str(row[i]) for row in rows) and all(not str(row[i]) or _NUMBER.fullmatch(str(row[i])) for row in rows)
        for i in range(len(header))
    ]


def markdown_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """``## title`` and a pipe table (``|`` in cells escaped) as lines, ending with a blank line."""
    align = " | ".join("---:" if right else "---" for right in numeric_columns(header, rows))
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", f"| {align} |"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines + [""]


def html_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """``<h2 id=slug>title</h2><table>``; cells are escaped, the id is the title before any ``(``."""
    slug = re.sub(r"[^a-z0-9]+", "-", title.split(" (")[0].lower()).strip("-")
    right = numeric_columns(header, rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td{" class=n" if right[i] else ""}>{html.escape(str(cell))}</td>'
                         for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<h2 id='{slug}'>{html.escape(title)}</h2><table><tr>{head}</tr>{body}</table>"


def rich_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
               cell: Callable[[str], str] = str):
    """A ``rich.table.Table`` (``cell`` may add markup, e.g. colour a status)."""
    from rich.table import Table as RichTable

    table = RichTable(title=title, title_justify="left")
    for column, right in zip(header, numeric_columns(header, rows)):
        table.add_column(column, overflow="fold", justify="right" if right else "left")
    for row in rows:
        table.add_row(*(cell(str(value)) for value in row))
    return table
