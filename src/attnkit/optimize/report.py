"""`OptimizationReport`: what `optimize()` changed, the proof that it still computes the same, and the speed."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field

from torch import nn

from attnkit.optimize.fuse import FusionPlan
from attnkit.optimize.rewrite import Rewrite, Skip
from attnkit.optimize.select import Selection

__all__ = ["Check", "Latency", "BackendUse", "Float8Accuracy", "Float8Variant", "OptimizationReport"]

FP8_LABEL = "FP8 (approximate, on request)"


@dataclass(frozen=True)
class Check:
    """One equivalence comparison (outputs or gradients, one mode, one dtype).

    ``max_abs``/``max_rel`` are the largest ``max|opt - ref|`` and ``max|opt - ref| / max|ref|``
    over the tensors compared. Each tensor has its own bound (see ``rule``); ``ratio`` is the
    largest error/bound, so the check passes iff ``ratio <= 1``; ``tolerance`` and ``baseline``
    are the bound and the original's own error at that worst tensor.
    """

    what: str
    """``"outputs"`` or ``"gradients"``."""
    mode: str
    """``"eval"`` or ``"train"``."""
    dtype: str
    max_abs: float
    max_rel: float
    tolerance: float
    rule: str
    passed: bool
    ratio: float = 0.0
    baseline: float | None = None
    tensors: int = 0
    """How many tensors were compared (outputs or parameter gradients)."""


@dataclass(frozen=True)
class Latency:
    """Forward latency of the original and the optimized model, measured in the same run."""

    device: str
    dtype: str
    before_ms: float
    after_ms: float
    compiled: bool
    clock: str

    @property
    def speedup(self) -> float:
        return self.before_ms / self.after_ms


@dataclass(frozen=True)
class BackendUse:
    """The backend one rewritten attention ran on for one call signature, and why."""

    path: str
    backend: str
    why: str
    rejected: dict[str, str]
    shape: str


@dataclass(frozen=True)
class Float8Accuracy:
    """How far the FP8 variant's outputs are from the original's, on the example inputs (eval, no dropout).

    Reference: the original model in float64. Errors are per output tensor; the worst tensor is reported.
    """

    max_rel: float
    """``max|fp8 - ref| / max|ref|``."""
    rel_rms: float
    """``||fp8 - ref||_2 / ||ref||_2`` (relative RMS error)."""
    exact_rel_rms: float
    """The same relative RMS of the exact optimized model in the same dtype: what rounding alone costs."""
    top1: float | None
    """Share of positions whose ``logits`` argmax (last axis) agrees with the reference; None without logits."""
    dtype: str
    """dtype the FP8 variant's non-GEMM parts and activations ran in."""


@dataclass(frozen=True)
class Float8Variant:
    """The FP8 inference variant ``OptimizeConfig(fp8=recipe)`` asks for: approximate, so never the returned model.

    Built from a deep copy of the exact optimized model (eager), its ``nn.Linear`` layers and fused projection
    groups converted by :func:`attnkit.fp8.convert_to_float8_training` where the measured speed table says
    FP8 is faster at the GEMM's shape (M = the tokens each layer saw on the example inputs).
    """

    recipe: str
    built: bool
    """False when it could not be built (``reason`` says why); the exact result is unaffected."""
    reason: str = ""
    emulated: bool = False
    """GEMMs emulated in float32 (``OptimizeConfig.fp8_emulate``): the FP8 numerics, none of the speed."""
    converted: int = 0
    """GEMM layers (linears and fused projection groups) running in FP8."""
    layers: int = 0
    """GEMM layers that could be converted (plain ``nn.Linear`` and fused projection groups)."""
    kept: dict[str, int] = field(default_factory=dict)
    """Why the others stay in high precision: reason -> how many layers."""
    accuracy: Float8Accuracy | None = None
    form: str = ""
    """The timed form reported (``"fp8"``, ``"fp8+compile"``...): the fastest one raced."""
    median_ms: float | None = None
    speedup_vs_eager: float | None = None
    """``eager_ms / fp8_ms``; with ``select``, the median paired ratio of the race (as for every candidate)."""
    speedup_vs_exact: float | None = None
    """``exact_ms / fp8_ms``: against the model ``optimize`` returned (median latencies of the same run)."""
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    """The FP8 model (the form timed); not serialised, not saved by ``save_optimized``."""

    def to_json(self) -> dict:
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "accuracy")}
        record["accuracy"] = None if self.accuracy is None else asdict(self.accuracy)
        return record

    def summary(self) -> str:
        """One line: what was converted, the accuracy and the speed (or why it was not built)."""
        if not self.built:
            return f"{FP8_LABEL}, recipe {self.recipe}: not built: {self.reason}"
        parts = [f"{FP8_LABEL}, recipe {self.recipe}{' (emulated)' if self.emulated else ''}: "
                 f"{self.converted}/{self.layers} GEMM layers in FP8"]
        acc = self.accuracy
        if acc is not None:
            top1 = "" if acc.top1 is None else f", top-1 agreement {acc.top1:.1%}"
            parts.append(f"error vs fp64 original: max rel {acc.max_rel:.1e}, rel RMS {acc.rel_rms:.1e} "
                         f"(exact {acc.dtype}: {acc.exact_rel_rms:.1e}){top1}")
        if self.median_ms is not None:
            vs_exact = "" if self.speedup_vs_exact is None else f", {self.speedup_vs_exact:.2f}x the exact pick"
            parts.append(f"{self.form} {self.median_ms:.3f} ms: {self.speedup_vs_eager:.2f}x eager{vs_exact}")
        else:
            parts.append("not timed")
        return "; ".join(parts)


@dataclass
class OptimizationReport:
    """Everything `optimize()` did; ``to_json()`` for files, ``render()``/``print`` for people."""

    model: str
    config: dict
    rewrites: list[Rewrite] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    backends: list[BackendUse] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    latency: Latency | None = None
    compiled: str = "none"
    """The ``torch.compile`` mode applied to the returned model (``"none"`` = eager)."""
    selection: Selection | None = None
    """With ``config.select``: every candidate timed and the one returned."""
    notes: list[str] = field(default_factory=list)
    kept: bool = True
    """False when an equivalence check failed and ``optimize`` returned the original model instead."""
    fusion: FusionPlan | None = None
    """Sibling projections fused into one GEMM, and the ones left separate with the reason (None: not tried)."""
    fp8: Float8Variant | None = None
    """With ``config.fp8``: the approximate FP8 variant, its accuracy and speed (never the returned model)."""

    @property
    def passed(self) -> bool:
        """Every equivalence check passed (True when none ran)."""
        return all(check.passed for check in self.checks)

    @property
    def rewritten(self) -> int:
        """How many attention modules run rewritten in the returned model: 0 when none was rewritten or
        the rewrite was not kept. Fused projections are counted apart (``fusion.groups``); a caller
        should say so and exit non-zero when neither was kept (the CLI does)."""
        return len(self.rewrites) if self.kept else 0

    def to_json(self) -> dict:
        record = asdict(dataclasses.replace(self, fp8=None))  # asdict would deep-copy the FP8 model
        record["fp8"] = None if self.fp8 is None else self.fp8.to_json()
        record["passed"] = self.passed
        record["rewritten"] = self.rewritten
        if self.latency is not None:
            record["latency"]["speedup"] = self.latency.speedup
        return record

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, default=str)

    def __repr__(self) -> str:
        speed = f", speedup={self.latency.speedup:.2f}x" if self.latency else ""
        fused = f", fused_groups={len(self.fusion.groups)}" if self.fusion is not None and self.fusion.groups else ""
        return (
            f"OptimizationReport(model={self.model!r}, rewrites={len(self.rewrites)}{fused}, skipped={len(self.skipped)}, "
            f"checks={sum(c.passed for c in self.checks)}/{len(self.checks)} passed{speed}, compiled={self.compiled!r})"
        )

    def render(self):
        """A ``rich`` renderable: rewrites, backends, checks, latency, skips and notes."""
        from rich.console import Group
        from rich.table import Table

        parts = []
        table = Table(title=f"attnkit optimize: {self.model}", title_justify="left")
        for column in ("module", "before -> after", "family", "what changed"):
            table.add_column(column)
        for r in _grouped(self.rewrites):
            table.add_row(r[0], r[1], r[2], r[3])
        parts.append(table)
        if self.backends:
            table = Table(title="attention backends", title_justify="left")
            for column in ("module", "call", "backend", "why"):
                table.add_column(column)
            for b in _grouped_backends(self.backends):
                table.add_row(*b)
            parts.append(table)
        if self.checks:
            table = Table(title="equivalence (random inputs)", title_justify="left")
            for column in ("check", "max abs", "max rel", "err/bound", "rule", "result"):
                table.add_column(column)
            for c in self.checks:
                result = "[green]pass[/green]" if c.passed else "[red]FAIL[/red]"
                table.add_row(f"{c.what} {c.mode} {c.dtype}", f"{c.max_abs:.1e}", f"{c.max_rel:.1e}", f"{c.ratio:.2f}", c.rule, result)
            parts.append(table)
        if self.latency is not None:
            lat = self.latency
            parts.append(
                f"latency ({lat.device}, {lat.dtype}, {lat.clock}): original {lat.before_ms:.3f} ms -> optimized "
                f"{lat.after_ms:.3f} ms ({lat.speedup:.2f}x{', torch.compile' if lat.compiled else ', eager'})"
            )
        if self.selection is not None:
            table = Table(title=f"select ({self.selection.clock}): {self.selection.summary}", title_justify="left")
            for column in ("variant", "median ms", "vs eager (paired rounds)", "eligible", "note"):
                table.add_column(column)
            for c in self.selection.candidates:
                ms = "-" if c.median_ms is None else f"{c.median_ms:.3f}"
                ratio = "-" if c.speedup is None or c.name == "eager" else f"{c.speedup:.2f}x ({c.low:.2f}-{c.high:.2f}, {c.wins}/{c.rounds} faster)"
                name = f"[bold]{c.name}[/bold]" if c.name == self.selection.picked else c.name
                table.add_row(name, ms, ratio, "yes" if c.eligible else "no", c.note)
            parts.append(table)
        if self.fp8 is not None:
            parts.append(self.fp8.summary())
        if self.fusion is not None and (self.fusion.groups or self.fusion.refused):
            table = Table(title="projections fused (one GEMM per group)", title_justify="left")
            for column in ("module", "projections", "result"):
                table.add_column(column)
            for g in self.fusion.groups:
                table.add_row(g.parent or "<root>", " + ".join(f"{n} ({w})" for n, w in zip(g.members, g.widths)), "fused")
            for r in self.fusion.refused:
                table.add_row(r.parent or "<root>", ", ".join(r.members), f"left separate: {r.reason}")
            parts.append(table)
        for skip in self.skipped:
            parts.append(f"left alone: {skip.path} ({skip.module_class}): {skip.reason}")
        parts.extend(f"note: {note}" for note in self.notes)
        return Group(*parts)

    def __rich__(self):
        return self.render()


def _grouped(rewrites: list[Rewrite]) -> list[tuple[str, str, str, str]]:
    """Collapse runs of identical rewrites (layer 0..N-1) into one row each."""
    rows: dict[tuple, list[str]] = {}
    for r in rewrites:
        rows.setdefault((f"{r.before} -> {r.after}", r.family, r.detail, _pattern(r.path)), []).append(r.path)
    return [(f"{pattern} (x{len(paths)})" if len(paths) > 1 else paths[0], change, family, detail) for (change, family, detail, pattern), paths in rows.items()]


def _grouped_backends(uses: list[BackendUse]) -> list[tuple[str, str, str, str]]:
    rows: dict[tuple, int] = {}
    for u in uses:
        key = (_pattern(u.path), u.shape, u.backend, u.why)
        rows[key] = rows.get(key, 0) + 1
    return [(f"{p} (x{n})" if n > 1 else p, shape, backend, why) for (p, shape, backend, why), n in rows.items()]


def _pattern(path: str) -> str:
    """``encoder.layer.3.attention`` -> ``encoder.layer.*.attention``."""
    return ".".join("*" if part.isdigit() else part for part in path.split("."))
