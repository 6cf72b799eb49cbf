"""`ValidationReport`: everything one run found, with a versioned JSON schema and Markdown."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnkit.errors import check_arg
from attnkit.utils.tables import Table, markdown_table
from attnkit.validate.accuracy import QUANTITIES, AccuracyResult
from attnkit.validate.compatibility import Environment, LayerSupport
from attnkit.validate.compile_amp import CompileAmpResult
from attnkit.validate.performance import PerfResult
from attnkit.validate.recommend import Recommendation

__all__ = ["SCHEMA", "ValidationReport"]

SCHEMA = "attnkit.validate/1"
"""Bump the number when a field changes meaning or goes away; adding fields keeps it."""

@dataclass
class ValidationReport:
    """The result of :func:`attnkit.validate.validate`. ``passed`` is what CI gates on."""

    model: str
    dtype: str
    device: str
    seed: int
    """Seed of the accuracy inputs; pass it as ``ValidateConfig(seed=...)`` to reproduce."""
    config: dict
    created: str
    schema: str = SCHEMA
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    environment: Environment | None = None
    layers: list[LayerSupport] = field(default_factory=list)
    model_notes: list[str] = field(default_factory=list)
    accuracy: list[AccuracyResult] = field(default_factory=list)
    performance: list[PerfResult] = field(default_factory=list)
    compile_amp: list[CompileAmpResult] = field(default_factory=list)
    recommendations: list[Recommendation] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    """Stages not run, with the reason."""
    attention_calls: int | None = None
    """Attention calls found in one forward (0: nothing to validate); None in reports written before it was counted."""

    @property
    def failures(self) -> list[AccuracyResult]:
        return [r for r in self.accuracy if r.status == "fail"]

    @property
    def found_attention(self) -> bool:
        """False when the run found no attention, so nothing was validated."""
        return self.attention_calls != 0

    @property
    def passed(self) -> bool:
        """True when attention was found and no backend failed accuracy (layer calls or the whole model's output)."""
        return self.found_attention and not self.failures

    @property
    def verdict(self) -> str:
        """``PASS``, ``FAIL (n failures)`` or ``NO ATTENTION``."""
        if not self.found_attention:
            return "NO ATTENTION"
        return "PASS" if self.passed else f"FAIL ({len(self.failures)} failures)"

    def __repr__(self) -> str:
        return (
            f"ValidationReport(model={self.model!r}, dtype={self.dtype}, device={self.device}, {self.verdict}, "
            f"layers={sum(len(g.layer.names) for g in self.layers)}, accuracy={len(self.accuracy)}, "
            f"performance={len(self.performance)}, seconds={self.seconds:.1f})"
        )

    def to_json(self) -> dict:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, record: dict) -> ValidationReport:
        schema = record.get("schema")
        check_arg(schema == SCHEMA, "schema", f"{SCHEMA!r}", schema, "The file comes from another attnkit version.")
        return _load(cls, record)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ValidationReport:
        return cls.from_json(json.loads(Path(path).read_text()))

    def tables(self, detail: bool = False) -> list[Table]:
        """The report as ``(title, header, rows)`` tables: the one table source of the terminal view
        (:func:`attnkit.validate.render`) and of :meth:`to_markdown` (``detail`` puts each backend's
        reason in the layer table, too wide for a terminal)."""
        tables = []
        env = self.environment
        if env is not None:
            rows = [[name, "yes" if why is None else f"no: {_short(why)}"] for name, why in env.backends.items()]
            title = f"Environment: torch {env.torch}, CUDA {env.cuda or '-'}, {env.device_name} ({env.device})"
            tables.append((title, ["backend", f"runs a plain {self.dtype} call"], rows))
        if self.layers:
            backends = list(self.layers[0].support)
            rows = []
            for group in self.layers:
                names = group.layer.names
                label = f"{names[0]}{f' (+{len(names) - 1})' if len(names) > 1 else ''}"
                cells = [
                    "blocked" if group.layer.blockers else ("yes" if why is None else (f"no: {_short(why, 60)}" if detail else "no"))
                    for why in group.support.values()
                ]
                rows.append([label, group.layer.kind, *cells])
            title = "Attention layers: which backends can run them" + ("" if detail else " (reasons in the JSON and Markdown)")
            tables.append((title, ["layers", "kind", *backends], rows))
            blocked = [[", ".join(g.layer.names[:2]) + (", ..." if len(g.layer.names) > 2 else ""), reason] for g in self.layers for reason in g.layer.blockers]
            if blocked:
                tables.append(("Layers that cannot reach any backend as written", ["layers", "why"], blocked))
        if self.accuracy:
            rows = [
                [r.backend, r.case, r.status, *(_fmt(r.errors[q].ratio, 2) if q in r.errors else "-" for q in QUANTITIES), _short(r.reason)]
                for r in self.accuracy
            ]
            tables.append((
                f"Accuracy vs float64 (error / math-backend error; pass <= {self.config.get('tolerance_factor', 2)}x + floor; seed {self.seed})",
                ["backend", "case", "status", "out", "dq", "dk", "dv", "reason"],
                rows,
            ))
        for scope, title in (("layer", "Attention calls"), ("model", "Whole model forward")):
            done = [r for r in self.performance if r.scope == scope and r.status == "ok"]
            if done:
                rows = [[r.backend, r.case, _fmt(r.median_ms), _fmt(r.p95_ms), _fmt(r.p99_ms), _fmt(r.throughput), _fmt(r.tflops), _fmt(r.peak_mem_mb)] for r in done]
                header = ["backend", "case", "p50 ms", "p95 ms", "p99 ms", "tokens/s" if scope == "layer" else "samples/s", "TFLOP/s", "peak MiB"]
                tables.append((f"Performance, {title.lower()} ({done[0].clock})", header, rows))
        not_run = {(r.backend, _short(r.reason)) for r in self.performance if r.status != "ok"}
        if not_run:
            tables.append(("Performance: backends not timed", ["backend", "reason"], [list(row) for row in sorted(not_run)]))
        if self.compile_amp:
            rows = [[r.check, r.status, _fmt(r.error.ratio if r.error else None, 2), _fmt(r.first_call_s), _fmt(r.median_ms), _short(r.reason)] for r in self.compile_amp]
            tables.append(("torch.compile and autocast", ["check", "status", "error ratio", "first call s", "p50 ms", "reason"], rows))
        return tables

    @property
    def summary(self) -> str:
        """The verdict as one sentence, with the run time."""
        if not self.found_attention:
            return f"NO ATTENTION: no attention found to validate in {self.model}; nothing was checked ({self.seconds:.1f} s)"
        if self.passed:
            return f"PASS: every tested backend is within tolerance ({self.seconds:.1f} s)"
        return f"FAIL: {len(self.failures)} accuracy failure(s) ({self.seconds:.1f} s)"

    def to_markdown(self) -> str:
        """The report as Markdown (tables, recommendations, verdict)."""
        lines = [f"# attnkit validate: {self.model} ({self.dtype}, {self.device})", "", f"**{self.summary}**", ""]
        for table in self.tables(detail=True):
            lines += markdown_table(*table)
        if self.skipped:
            lines += ["## Skipped", ""] + [f"- {stage}: {reason}" for stage, reason in self.skipped.items()] + [""]
        if self.recommendations:
            lines += ["## Recommendations", ""] + [f"- **{rec.kind}** {rec.text}" for rec in self.recommendations] + [""]
        return "\n".join(lines)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _short(text: str | None, limit: int = 90) -> str:
    text = (text or "").split(". Usable here")[0].split("cannot run this call: ")[-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value: Any) -> Any:
    """Strict JSON: non-finite floats become the strings "inf"/"-inf"/"nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def _load(tp: Any, value: Any) -> Any:
    """Rebuild ``tp`` (a dataclass, list/dict of them, optional, float) from its JSON form."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        return _load(next(a for a in args if a is not type(None)), value)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: _load(hints[f.name], value[f.name]) for f in dataclasses.fields(tp) if f.name in value})
    if origin is list:
        return [_load(args[0], item) for item in value]
    if origin is dict:
        return {key: _load(args[1], item) for key, item in value.items()}
    if tp is float:
        return float(value)
    return value
