"""`select`: time the variants of a model on its example inputs and keep the fastest that is proven equivalent.

Candidates, named as in ``benchmarks/optimize/run.py``: ``eager`` (the original), ``rewrite`` (the
rewritten model) and, when compiling is allowed, ``compile`` and ``rewrite+compile``. Each runs
inference on the example inputs: one untimed first call (compilation), ``warmup`` more, then
``repeats`` timed calls (CUDA events on a GPU, wall clock elsewhere); the median decides. Only
candidates that passed the equivalence checks may win (compiled ones inherit the check of the
model they compile), and the original is always a candidate, so the pick is never slower than
the original on the measured inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["Candidate", "Selection", "pick", "select_variant"]


@dataclass(frozen=True)
class Candidate:
    """One variant, its measured latency and whether it may be picked."""

    name: str
    """``"eager"`` (the original), ``"compile"``, ``"rewrite"`` or ``"rewrite+compile"``."""
    median_ms: float | None
    """Median latency; None when it could not run (``note`` says why)."""
    eligible: bool
    """Passed the equivalence checks (the original and its compiled form always do)."""
    note: str = ""


@dataclass(frozen=True)
class Selection:
    """Every candidate and the one returned."""

    candidates: list[Candidate]
    picked: str
    summary: str
    """One line, e.g. ``"picked rewrite+compile: 1.22x eager"``."""
    clock: str


def pick(candidates: list[Candidate]) -> tuple[str, str]:
    """``(name, summary)`` of the fastest eligible candidate; ``"eager"`` wins ties and when nothing ran faster."""
    eager = next(c for c in candidates if c.name == "eager")
    timed = [c for c in candidates if c.eligible and c.median_ms is not None]
    best = min(timed, key=lambda c: (c.median_ms, c.name != "eager"), default=eager)
    if best.name == "eager" or eager.median_ms is None:
        return "eager", "nothing beat the original: returned it unchanged"
    return best.name, f"picked {best.name}: {eager.median_ms / best.median_ms:.2f}x eager"


def select_variant(
    original: nn.Module,
    rewritten: nn.Module,
    run: Callable[[nn.Module], Any],
    *,
    rewrite_passed: bool,
    compile_mode: str,
    warmup: int,
    repeats: int,
    device: torch.device,
) -> tuple[nn.Module, Selection]:
    """Time the candidates with ``run(module)`` (one inference call) and return ``(fastest module, selection)``.

    ``compile_mode`` is ``"none"`` (eager candidates only) or a ``torch.compile`` mode.
    """
    from attnkit.bench import time_fn

    variants = {"eager": (original, True), "rewrite": (rewritten, rewrite_passed)}
    if compile_mode != "none":
        mode = None if compile_mode == "default" else compile_mode
        variants["compile"] = (torch.compile(original, mode=mode), True)
        variants["rewrite+compile"] = (torch.compile(rewritten, mode=mode), rewrite_passed)
    candidates, clock = [], ""
    modes = [(module, module.training) for module in (original, rewritten)]
    for name, (module, eligible) in variants.items():
        module.eval()
        try:
            with torch.inference_mode():
                run(module)  # first call: compilation
                timing = time_fn(lambda: run(module), warmup=warmup, repeats=repeats, device=device)
        except Exception as error:  # noqa: BLE001 - a variant that cannot run only loses the race
            candidates.append(Candidate(name, None, eligible, f"failed: {type(error).__name__}: {str(error)[:200]}"))
            continue
        clock = timing.clock
        note = "" if eligible else "failed the equivalence checks"
        candidates.append(Candidate(name, timing.median_ms, eligible, note))
    for module, training in modes:
        module.train(training)
    name, summary = pick(candidates)
    return variants[name][0], Selection(candidates, name, summary, clock)
