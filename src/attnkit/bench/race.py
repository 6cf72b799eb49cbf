"""`race`: time competing callables in interleaved rounds and compare each with a baseline by paired ratios.

Clocks, power states and other tenants drift over seconds, so timing A for a while and then B
mixes the drift into their difference (the H100 runs of ``benchmarks/optimize`` swung 10-20%
between two timings of one variant). A race times every callable once per round, back to back,
rotating who goes first, and takes the ratio ``baseline / candidate`` within each round, where the
drift cancels. The median paired ratio is the speed-up, its range over the rounds the spread,
and the number of rounds the candidate won is the confidence: a variant no faster than the
baseline wins all of 5 rounds with probability 1/32 (a one-sided sign test).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from attnkit.bench.timing import time_fn
from attnkit.errors import check_arg

__all__ = ["Entry", "race"]


@dataclass(frozen=True)
class Entry:
    """One callable's result in a race: per-round median latency and paired ratio to the baseline."""

    name: str
    round_ms: tuple[float, ...] = ()
    """Median latency of each round, ms."""
    ratios: tuple[float, ...] = ()
    """``baseline_ms / this_ms`` per round (> 1: faster than the baseline)."""
    error: str = ""
    """Why it could not run (then no timings)."""

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.round_ms) if self.round_ms else None

    @property
    def speedup(self) -> float | None:
        """Median paired ratio to the baseline."""
        return statistics.median(self.ratios) if self.ratios else None

    @property
    def wins(self) -> int:
        """Rounds in which this ran faster than the baseline."""
        return sum(r > 1.0 for r in self.ratios)

    def spread(self) -> str:
        """``"1.18-1.24x, faster in 5/5 rounds"`` (or the error)."""
        if not self.ratios:
            return self.error or "not timed"
        return f"{min(self.ratios):.2f}-{max(self.ratios):.2f}x, faster in {self.wins}/{len(self.ratios)} rounds"

    def to_json(self) -> dict:
        return {
            "name": self.name, "median_ms": self.median_ms, "speedup": self.speedup, "wins": self.wins,
            "rounds": len(self.ratios), "round_ms": list(self.round_ms), "ratios": list(self.ratios), "error": self.error,
        }  # fmt: skip


def race(
    fns: Mapping[str, Callable[[], object]],
    *,
    baseline: str,
    rounds: int = 5,
    repeats: int = 10,
    warmup: int = 2,
    device: torch.device | str | None = None,
) -> dict[str, Entry]:
    """Time every callable ``rounds`` times, interleaved; each round is ``warmup`` + ``repeats`` calls.

    Args:
        fns: name -> zero-argument callable (already compiled/warmed: the first call is not special here).
        baseline: the name every ratio is taken against (it must run).
        rounds: interleaved rounds; the order rotates by one each round.
        repeats, warmup: calls per round (:func:`attnkit.bench.time_fn`).
    Returns:
        name -> :class:`Entry`, in the order of ``fns``. A callable that raises gets an entry with
        the error and drops out of the race (the baseline's error propagates).
    """
    check_arg(baseline in fns, "baseline", f"one of {list(fns)}", baseline)
    check_arg(isinstance(rounds, int) and rounds >= 1, "rounds", "an int >= 1", rounds)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    errors: dict[str, str] = {}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            if name in errors:
                continue
            try:
                times[name].append(time_fn(fns[name], warmup=warmup, repeats=repeats, device=device).median_ms)
            except torch.OutOfMemoryError:
                raise
            except Exception as error:  # noqa: BLE001 - a candidate that cannot run only loses the race
                if name == baseline:
                    raise
                errors[name] = f"{type(error).__name__}: {str(error)[:200]}"
    base = times[baseline]
    return {
        name: Entry(name, error=errors[name]) if name in errors
        else Entry(name, tuple(times[name]), tuple(b / t for b, t in zip(base, times[name])))
        for name in names
    }  # fmt: skip
