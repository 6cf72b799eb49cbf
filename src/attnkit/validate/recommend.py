"""Recommendations: concrete changes, each backed by numbers measured in this run."""

from __future__ import annotations

from dataclasses import dataclass, field

from attnkit.ops import BACKENDS
from attnkit.validate.accuracy import AccuracyResult
from attnkit.validate.compatibility import LayerSupport
from attnkit.validate.compile_amp import CompileAmpResult
from attnkit.validate.performance import DEFAULT, PerfResult

__all__ = ["Recommendation", "recommend"]

_MIN_SPEEDUP = 1.1  # below this, a switch is not worth recommending
_SDPA_KERNELS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}


@dataclass
class Recommendation:
    """One suggested change and the measurements behind it."""

    text: str
    kind: str
    """``"fix"`` (something is wrong), ``"speed"`` or ``"info"``."""
    evidence: dict = field(default_factory=dict)


def _passing(accuracy: list[AccuracyResult]) -> set[str]:
    failed = {r.backend for r in accuracy if r.status == "fail"}
    return {r.backend for r in accuracy if r.status == "pass"} - failed


def _layer_times(perf: list[PerfResult]) -> dict[tuple[str, str], PerfResult]:
    return {(r.case, r.backend): r for r in perf if r.scope == "layer" and r.status == "ok"}


def _best_speedups(perf: list[PerfResult], allowed: set[str]) -> dict[str, tuple[float, PerfResult, PerfResult]]:
    """Per case, the fastest accurate backend against ``default``: case -> (speedup, best, default)."""
    times = _layer_times(perf)
    best: dict[str, tuple[float, PerfResult, PerfResult]] = {}
    for (case, backend), result in times.items():
        default = times.get((case, DEFAULT))
        if backend in allowed and default is not None:
            speedup = default.median_ms / result.median_ms
            if case not in best or speedup > best[case][0]:
                best[case] = (speedup, result, default)
    return best


def _fixes(accuracy: list[AccuracyResult]) -> list[Recommendation]:
    recs = []
    for backend in sorted({r.backend for r in accuracy if r.status == "fail"}):
        worst = max((r for r in accuracy if r.backend == backend and r.status == "fail"), key=lambda r: r.worst_ratio or float("inf"))
        recs.append(Recommendation(f"Do not use backend {backend!r}: {worst.case}: {worst.reason}.", "fix", {"case": worst.case, "ratio": worst.worst_ratio}))
    return recs


def _blocked(layers: list[LayerSupport], speedups: dict[str, tuple[float, PerfResult, PerfResult]]) -> list[Recommendation]:
    """Layers that never reach a fused kernel, with the best fused speedup measured."""
    recs = []
    gain = max((s for s in speedups.values() if s[1].backend != "math"), key=lambda s: s[0], default=None)
    for group in layers:
        if group.layer.blockers:
            names = group.layer.names
            listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            claim = f": {gain[1].backend} is {gain[0]:.1f}x faster than the layer's path at {gain[1].case}" if gain else ""
            recs.append(Recommendation(
                f"{len(names)} layer(s) ({listed}) cannot reach a fused kernel: {group.layer.blockers[0]}{claim}.",
                "speed",
                {"layers": names, "speedup": gain[0] if gain else None},
            ))  # fmt: skip
    return recs


def _how_to_run(backend: str) -> str:
    """Only ways that exist for ``backend``: ``sdpa_kernel`` knows PyTorch's fused SDPA kernels, not flex or chunked."""
    if backend not in BACKENDS:  # a custom callable under test
        return f"use your {backend!r} kernel"
    how = f"force it with attnkit.ops.attention(..., backend={backend!r})"
    if backend in _SDPA_KERNELS:
        how += f" or torch.nn.attention.sdpa_kernel(SDPBackend.{_SDPA_KERNELS[backend]})"
    return how


def _layer_speed(speedups: dict[str, tuple[float, PerfResult, PerfResult]]) -> list[Recommendation]:
    """One line per backend that is the fastest accurate choice at some shapes."""
    wins: dict[str, list[tuple[float, PerfResult, PerfResult]]] = {}
    for speedup, best, default in speedups.values():
        if speedup >= _MIN_SPEEDUP and best.backend != DEFAULT:
            wins.setdefault(best.backend, []).append((speedup, best, default))
    recs = []
    for backend, found in sorted(wins.items(), key=lambda item: -len(item[1])):
        speedup, best, default = max(found, key=lambda w: (w[1].seq, w[1].batch))
        low, high = min(w[0] for w in found), max(w[0] for w in found)
        recs.append(Recommendation(
            f"Backend {backend!r} passed accuracy and is the fastest at {len(found)} of {len(speedups)} timed shapes, "
            f"{low:.2f}-{high:.2f}x faster than the default ({best.median_ms:.3g} vs {default.median_ms:.3g} ms at {best.case}); "
            f"{_how_to_run(backend)}.",
            "speed",
            {"backend": backend, "shapes": [w[1].case for w in found], "speedups": [w[0] for w in found]},
        ))  # fmt: skip
    return recs


def _model_speed(perf: list[PerfResult], accurate: set[str]) -> list[Recommendation]:
    times = {r.backend: r for r in perf if r.scope == "model" and r.status == "ok"}
    best = min((r for name, r in times.items() if name in accurate), key=lambda r: r.median_ms, default=None)
    if DEFAULT not in times or best is None or times[DEFAULT].median_ms / best.median_ms < _MIN_SPEEDUP:
        return []
    speedup = times[DEFAULT].median_ms / best.median_ms
    text = f"Whole model: forcing {best.backend!r} makes the forward {speedup:.2f}x faster ({best.median_ms:.3g} vs {times[DEFAULT].median_ms:.3g} ms)."
    return [Recommendation(text, "speed", {"backend": best.backend, "speedup": speedup})]


def _compile_amp(checks: list[CompileAmpResult]) -> list[Recommendation]:
    recs = []
    for check in checks:
        if check.status == "fail":
            recs.append(Recommendation(f"{check.check} failed: {check.reason}.", "fix", {"check": check.check}))
        elif check.status == "pass" and check.median_ms and check.eager_median_ms and check.eager_median_ms / check.median_ms >= _MIN_SPEEDUP:
            speedup = check.eager_median_ms / check.median_ms
            text = f"{check.check} is {speedup:.2f}x faster than eager ({check.median_ms:.3g} vs {check.eager_median_ms:.3g} ms) within tolerance."
            recs.append(Recommendation(text, "speed", {"check": check.check, "speedup": speedup}))
    return recs


def _dtype(layers: list[LayerSupport]) -> list[Recommendation]:
    blocked = {name: why for group in layers for name, why in group.support.items() if why and "needs dtype" in why}
    if not blocked:
        return []
    return [Recommendation(f"{', '.join(sorted(blocked))} cannot run in this dtype ({next(iter(blocked.values()))}): validate with --dtype bf16 to measure them.", "info")]


def recommend(
    layers: list[LayerSupport],
    accuracy: list[AccuracyResult],
    perf: list[PerfResult],
    compile_amp: list[CompileAmpResult],
    model_notes: list[str],
) -> list[Recommendation]:
    """Turn the measurements into a short list of concrete changes: fixes first, then speed, then notes.

    Only backends that passed accuracy are ever recommended; CPU wall-clock timings give no speed advice.
    """
    recs = _fixes(accuracy)
    if any(r.clock == "cpu-wall" for r in perf):
        recs.append(Recommendation("Timings are CPU wall-clock on a shared machine: no speed advice from them; run on the GPU you deploy on.", "info"))
        perf = []
    accurate = _passing(accuracy)
    speedups = _best_speedups(perf, accurate)
    recs += _blocked(layers, speedups) + _layer_speed(speedups) + _model_speed(perf, accurate) + _compile_amp(compile_amp) + _dtype(layers)
    return recs + [Recommendation(note, "info") for note in model_notes]
