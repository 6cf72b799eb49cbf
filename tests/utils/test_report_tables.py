"""The one (title, header, rows) renderer: alignment, escaping, anchors, and analyze's three views agreeing."""

from __future__ import annotations

from rich.console import Console

from attnkit.utils.tables import html_table, markdown_table, numeric_columns, rich_table

_HEADER = ["name", "ms", "note"]
_ROWS = [["a|b", "1.500", "<x>"], ["c", "", "2 (2)"], ["d", "-3e-4", "7"]]


def test_numeric_columns_only_where_every_filled_cell_is_a_number():
    assert numeric_columns(_HEADER, _ROWS) == [False, True, False]
    assert numeric_columns(["empty"], [[""], [""]]) == [False]


def test_markdown_aligns_numbers_and_escapes_pipes():
    lines = markdown_table("Times (2 runs)", _HEADER, _ROWS)
    assert lines[:4] == ["## Times (2 runs)", "", "| name | ms | note |", "| --- | ---: | --- |"]
    assert lines[4] == "| a\\|b | 1.500 | <x> |" and lines[-1] == ""


def test_html_escapes_cells_and_anchors_the_title():
    text = html_table("Times (2 runs)", _HEADER, _ROWS)
    assert text.startswith("<h2 id='times'>Times (2 runs)</h2><table>")
    assert "&lt;x&gt;" in text and "<x>" not in text and "<td class=n>1.500</td>" in text


def test_rich_table_applies_cell_markup():
    console = Console(record=True, width=80)
    console.print(rich_table("Times", _HEADER, _ROWS, cell=lambda c: f"[bold]{c}[/]" if c == "c" else c))
    shown = console.export_text()
    assert "Times" in shown and "a|b" in shown and "[bold]" not in shown and "-3e-4" in shown
