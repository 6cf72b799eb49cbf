"""`select`: race the variants of a model on its example inputs and keep the fastest proven one, with a confidence.

Candidates: ``eager`` (the original), ``rewrite`` (the rewritten model) and, for each allowed
``torch.compile`` mode, both compiled: ``compile`` / ``rewrite+compile`` for the default mode,
``compile:<mode>`` / ``rewrite+compile:<mode>`` for the others (names shared with
``benchmarks/optimize/run.py``). Each runs inference on the example inputs: one untimed first call
(compilation), then :func:`attnkit.bench.race` rounds (every variant once per round, interleaved,
paired ratio to ``eager`` per round).

The rule (:func:`pick`): a variant wins only if it passed the equivalence checks (compiled ones
inherit the check of the model they compile), ran faster than the original in **every** round
and its median paired ratio is at least ``1 + min_gain``; among such variants the highest median
ratio wins. Otherwise the original is kept: a gain inside the noise is no gain.

Approximate variants (the FP8 model of ``OptimizeConfig.fp8``: ``fp8``, ``fp8+compile``...) race in the
same rounds, so their times are comparable, but are never eligible: they are reported, not picked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from attnkit.bench.race import Entry, race

__all__ = ["Candidate", "Selection", "MIN_GAIN", "pick", "select_variant", "variant_name", "compile_mode_of", "compiled", "build_variants",
           "approximate_variants", "APPROXIMATE_NOTE"]

MIN_GAIN = 0.02
"""Smallest median speed-up (2%) for which a variant replaces the original."""
APPROXIMATE_NOTE = "approximate (FP8): reported, never picked"


@dataclass(frozen=True)
class Candidate:
    """One variant, its raced latency against the original and whether it may be picked."""

    name: str
    """``"eager"`` (the original), ``"rewrite"``, ``"compile"``, ``"rewrite+compile"``, ``"compile:<mode>"``..."""
    median_ms: float | None
    """Median of the per-round median latencies; None when it could not run (``note`` says why)."""
    eligible: bool
    """Passed the equivalence checks (the original and its compiled forms always do)."""
    note: str = ""
    speedup: float | None = None
    """Median over rounds of ``eager_ms / this_ms`` measured in the same round."""
    wins: int = 0
    """Rounds in which it ran faster than the original."""
    rounds: int = 0
    low: float | None = None
    """Smallest and largest per-round ratio."""
    high: float | None = None

    @classmethod
    def from_entry(cls, entry: Entry, eligible: bool, why_not: str = "failed the equivalence checks") -> "Candidate":
        note = entry.error and f"failed: {entry.error}" or ("" if eligible else why_not)
        return cls(entry.name, entry.median_ms, eligible, note, entry.speedup, entry.wins, len(entry.ratios),
                   min(entry.ratios, default=None), max(entry.ratios, default=None))  # fmt: skip


@dataclass(frozen=True)
class Selection:
    """Every candidate and the one returned."""

    candidates: list[Candidate]
    picked: str
    summary: str
    """One line, e.g. ``"picked rewrite+compile: 1.22x eager (median of 5 paired rounds, 1.19-1.25x)"``."""
    clock: str


def pick(candidates: list[Candidate], min_gain: float = MIN_GAIN) -> tuple[str, str]:
    """``(name, summary)``: the proven variant with the highest median ratio among those faster than the
    original in every round by at least ``min_gain``; ``"eager"`` when there is none."""
    proven = [c for c in candidates if c.name != "eager" and c.eligible and c.speedup is not None]
    winners = [c for c in proven if c.rounds and c.wins == c.rounds and c.speedup >= 1 + min_gain]
    if not winners:
        closest = max(proven, key=lambda c: c.speedup, default=None)
        hint = f" (closest: {closest.name} {closest.speedup:.2f}x, faster in {closest.wins}/{closest.rounds} rounds)" if closest else ""
        return "eager", f"kept the original: no proven variant was faster in every round by >= {min_gain:.0%}{hint}"
    best = max(winners, key=lambda c: c.speedup)
    return best.name, f"picked {best.name}: {best.speedup:.2f}x eager (median of {best.rounds} paired rounds, {best.low:.2f}-{best.high:.2f}x)"


def variant_name(rewritten: bool, mode: str | None) -> str:
    """``(False, None) -> "eager"``, ``(True, "default") -> "rewrite+compile"``, ``(False, "max-autotune") -> "compile:max-autotune"``."""
    base = "rewrite" if rewritten else "eager"
    if mode is None:
        return base
    compiled = "rewrite+compile" if rewritten else "compile"
    return compiled if mode == "default" else f"{compiled}:{mode}"


def compile_mode_of(variant: str) -> str:
    """The ``torch.compile`` mode of a variant name: ``"rewrite+compile:max-autotune" -> "max-autotune"``,
    ``"compile" -> "default"``, ``"rewrite" -> "none"`` (the inverse of :func:`variant_name`)."""
    if "compile" not in variant:
        return "none"
    return variant.partition(":")[2] or "default"


def compiled(module: nn.Module, mode: str) -> nn.Module:
    """``torch.compile(module)`` with one of ``COMPILE_MODES`` (``"default"`` = torch's default mode). Shapes
    are torch's default: static first, dynamic after a recompile (what a user calling it with other
    batch sizes needs; the timed example shape compiles static either way)."""
    return torch.compile(module, mode=None if mode == "default" else mode)


def build_variants(original: nn.Module, rewritten: nn.Module, compile_modes: tuple[str, ...], rewrite_passed: bool) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (module, eligible): both models eager, then both compiled with each mode."""
    variants = {"eager": (original, True), "rewrite": (rewritten, rewrite_passed)}
    for mode in compile_modes:
        for is_rewrite, module in ((False, original), (True, rewritten)):
            variants[variant_name(is_rewrite, mode)] = (compiled(module, mode), rewrite_passed or not is_rewrite)
    return variants


def approximate_variants(module: nn.Module, compile_modes: tuple[str, ...], base: str = "fp8") -> dict[str, nn.Module]:
    """name -> module: ``module`` eager (``base``) and compiled with each mode (``fp8+compile``, ``fp8+compile:<mode>``)."""
    variants = {base: module}
    for mode in compile_modes:
        variants[f"{base}+compile" if mode == "default" else f"{base}+compile:{mode}"] = compiled(module, mode)
    return variants


def select_variant(
    original: nn.Module,
    rewritten: nn.Module,
    run: Callable[[nn.Module], Any],
    *,
    rewrite_passed: bool,
    compile_modes: tuple[str, ...],
    rounds: int,
    warmup: int,
    repeats: int,
    device: torch.device,
    approximate: dict[str, nn.Module] | None = None,
) -> tuple[nn.Module, Selection]:
    """Race the candidates with ``run(module)`` (one inference call) and return ``(picked module, selection)``.

    ``approximate`` (name -> module, e.g. from :func:`approximate_variants`) race too, never eligible."""
    variants = build_variants(original, rewritten, compile_modes, rewrite_passed)
    approximate = approximate or {}
    variants.update({name: (module, False) for name, module in approximate.items()})
    raced = (original, rewritten, *approximate.values())
    modes = [(module, module.training) for module in raced]
    for module in raced:
        module.eval()
    ready, failed = {}, {}
    try:
        with torch.inference_mode():
            for name, (module, _) in variants.items():
                try:
                    run(module)  # first call: compilation
                    ready[name] = lambda module=module: run(module)
                except torch.OutOfMemoryError:
                    raise
                except Exception as error:  # noqa: BLE001 - a variant that cannot run only loses the race
                    if name == "eager":
                        raise
                    failed[name] = Entry(name, error=f"{type(error).__name__}: {str(error)[:200]}")
            entries = race(ready, baseline="eager", rounds=rounds, repeats=repeats, warmup=warmup, device=device)
    finally:
        for module, training in modes:
            module.train(training)
    entries.update(failed)
    candidates = [Candidate.from_entry(entries[name], eligible, APPROXIMATE_NOTE if name in approximate else "failed the equivalence checks")
                  for name, (_, eligible) in variants.items()]
    name, summary = pick(candidates)
    clock = "cuda-events" if torch.device(device).type == "cuda" else "cpu-wall"
    return variants[name][0], Selection(candidates, name, summary, clock)
