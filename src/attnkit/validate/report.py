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
from attnkit.validate.accuracy import AccuracyResult
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

    def to_markdown(self) -> str:
        from attnkit.validate.render import markdown

        return markdown(self)


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
