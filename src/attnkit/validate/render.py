"""Human-readable views of a `ValidationReport`: a rich terminal summary and Markdown."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from attnkit.validate.accuracy import QUANTITIES

if TYPE_CHECKING:
    from attnkit.validate.report import ValidationReport

__all__ = ["render", "markdown"]

_STATUS_STYLE = {"pass": "green", "ok": "green", "fail": "bold red", "error": "red", "skip": "yellow"}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _short(text: str | None, limit: int = 90) -> str:
    text = (text or "").split(". Usable here")[0].split("cannot run this call: ")[-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tables(report: ValidationReport, detail: bool = False) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report as ``(title, header, rows)`` tables; shared by the terminal and Markdown views
    (``detail`` puts each backend's reason in the layer table, too wide for a terminal)."""
    tables = []
    env = report.environment
    if env is not None:
        rows = [[name, "yes" if why is None else f"no: {_short(why)}"] for name, why in env.backends.items()]
        title = f"Environment: torch {env.torch}, CUDA {env.cuda or '-'}, {env.device_name} ({env.device})"
        tables.append((title, ["backend", f"runs a plain {report.dtype} call"], rows))
    if report.layers:
        backends = list(report.layers[0].support)
        rows = []
        for group in report.layers:
            names = group.layer.names
            label = f"{names[0]}{f' (+{len(names) - 1})' if len(names) > 1 else ''}"
            cells = [
                "blocked" if group.layer.blockers else ("yes" if why is None else (f"no: {_short(why, 60)}" if detail else "no"))
                for why in group.support.values()
            ]
            rows.append([label, group.layer.kind, *cells])
        title = "Attention layers: which backends can run them" + ("" if detail else " (reasons in the JSON and Markdown)")
        tables.append((title, ["layers", "kind", *backends], rows))
        blocked = [[", ".join(g.layer.names[:2]) + (", ..." if len(g.layer.names) > 2 else ""), reason] for g in report.layers for reason in g.layer.blockers]
        if blocked:
            tables.append(("Layers that cannot reach any backend as written", ["layers", "why"], blocked))
    if report.accuracy:
        rows = [
            [r.backend, r.case, r.status, *(_fmt(r.errors[q].ratio, 2) if q in r.errors else "-" for q in QUANTITIES), _short(r.reason)]
            for r in report.accuracy
        ]
        tables.append((
            f"Accuracy vs float64 (error / math-backend error; pass <= {report.config.get('tolerance_factor', 2)}x + floor; seed {report.seed})",
            ["backend", "case", "status", "out", "dq", "dk", "dv", "reason"],
            rows,
        ))
    for scope, title in (("layer", "Attention calls"), ("model", "Whole model forward")):
        done = [r for r in report.performance if r.scope == scope and r.status == "ok"]
        if done:
            rows = [[r.backend, r.case, _fmt(r.median_ms), _fmt(r.p95_ms), _fmt(r.p99_ms), _fmt(r.throughput), _fmt(r.tflops), _fmt(r.peak_mem_mb)] for r in done]
            header = ["backend", "case", "p50 ms", "p95 ms", "p99 ms", "tokens/s" if scope == "layer" else "samples/s", "TFLOP/s", "peak MiB"]
            tables.append((f"Performance, {title.lower()} ({done[0].clock})", header, rows))
    not_run = {(r.backend, _short(r.reason)) for r in report.performance if r.status != "ok"}
    if not_run:
        tables.append(("Performance: backends not timed", ["backend", "reason"], [list(row) for row in sorted(not_run)]))
    if report.compile_amp:
        rows = [[r.check, r.status, _fmt(r.error.ratio if r.error else None, 2), _fmt(r.first_call_s), _fmt(r.median_ms), _short(r.reason)] for r in report.compile_amp]
        tables.append(("torch.compile and autocast", ["check", "status", "error ratio", "first call s", "p50 ms", "reason"], rows))
    return tables


def _verdict(report: ValidationReport) -> str:
    if not report.found_attention:
        return f"NO ATTENTION: no attention found to validate in {report.model}; nothing was checked ({report.seconds:.1f} s)"
    if report.passed:
        return f"PASS: every tested backend is within tolerance ({report.seconds:.1f} s)"
    return f"FAIL: {len(report.failures)} accuracy failure(s) ({report.seconds:.1f} s)"


def render(report: ValidationReport, console: Console | None = None) -> None:
    """Print the report as rich tables, recommendations and the verdict."""
    console = console or Console()
    console.rule(f"attnkit validate {report.model} ({report.dtype}, {report.device})")
    for title, header, rows in _tables(report):
        table = Table(title=title, title_justify="left", show_lines=False)
        for column in header:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*(f"[{_STATUS_STYLE[cell]}]{cell}[/]" if cell in _STATUS_STYLE else cell for cell in row))
        console.print(table)
    for stage, reason in report.skipped.items():
        console.print(f"[yellow]skipped {stage}[/]: {reason}")
    for rec in report.recommendations:
        console.print(f"[bold]{rec.kind}[/] {rec.text}")
    console.print(f"[{'green' if report.passed else 'bold red'}]{_verdict(report)}[/]")


def markdown(report: ValidationReport) -> str:
    """The report as Markdown (tables, recommendations, verdict)."""
    lines = [f"# attnkit validate: {report.model} ({report.dtype}, {report.device})", "", f"**{_verdict(report)}**", ""]
    for title, header, rows in _tables(report, detail=True):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
        lines.append("")
    if report.skipped:
        lines += ["## Skipped", ""] + [f"- {stage}: {reason}" for stage, reason in report.skipped.items()] + [""]
    if report.recommendations:
        lines += ["## Recommendations", ""] + [f"- **{rec.kind}** {rec.text}" for rec in report.recommendations] + [""]
    return "\n".join(lines)
