"""`select`: the fastest proven variant wins, the original when nothing beats it, and the report shows every candidate."""

from __future__ import annotations

import pytest
import torch

import statistics

from attnkit.bench import Entry, race
from attnkit.optimize import Candidate, OptimizeConfig, optimize, pick, variant_name
from optimize_models import build


def _raced(name: str, ratios: tuple[float, ...] | None, eligible: bool = True) -> Candidate:
    """A candidate with the given per-round ratios to eager (None: it failed to run)."""
    if ratios is None:
        return Candidate(name, None, eligible, "failed: RuntimeError: boom")
    entry = Entry(name, tuple(2.0 / r for r in ratios), tuple(ratios))
    return Candidate.from_entry(entry, eligible)


EAGER = _raced("eager", (1.0,) * 5)


@pytest.mark.parametrize(
    "ratios, picked",
    [
        ({"rewrite": (1.3,) * 5, "compile": (1.5,) * 5, "rewrite+compile": (1.9, 2.0, 2.1, 2.0, 1.95)}, "rewrite+compile"),
        ({"rewrite": (0.8,) * 5}, "eager"),  # slower: the original
        ({"rewrite": (1.01,) * 5}, "eager"),  # faster in every round, but by less than MIN_GAIN
        ({"rewrite": (1.5, 1.5, 0.97, 1.5, 1.5)}, "eager"),  # lost one round: inside the noise
        ({"rewrite": None, "compile": (1.1,) * 5}, "compile"),  # a variant that failed to run
    ],
)
def test_pick_needs_a_gain_in_every_round(ratios, picked):
    candidates = [EAGER] + [_raced(name, r) for name, r in ratios.items()]
    name, summary = pick(candidates)
    assert name == picked
    if picked == "eager":
        assert summary.startswith("kept the original: no proven variant was faster in every round by >= 2%")
    else:
        speedup = statistics.median(ratios[picked])
        assert summary.startswith(f"picked {picked}: {speedup:.2f}x eager (median of 5 paired rounds")


def test_pick_only_proven_variants():
    candidates = [EAGER, _raced("rewrite", (4.0,) * 5, eligible=False), _raced("compile", (1.3,) * 5)]
    assert pick(candidates)[0] == "compile"


def test_race_pairs_rounds_and_catches_a_slower_variant():
    def work(n):
        def run():
            x = torch.ones(n, n)
            for _ in range(4):
                x = x @ x / n
            return x
        return run

    def broken():
        raise RuntimeError("planted failure")

    entries = race({"eager": work(96), "slow": work(192), "broken": broken}, baseline="eager", rounds=3, repeats=2, warmup=1, device="cpu")
    assert entries["eager"].ratios == (1.0, 1.0, 1.0)
    slow = entries["slow"]
    assert len(slow.round_ms) == 3 and slow.speedup < 1.0  # 8x the FLOPs
    assert entries["broken"].error.startswith("RuntimeError: planted failure") and entries["broken"].median_ms is None
    name, _ = pick([Candidate.from_entry(e, True) for e in entries.values()])
    assert name == "eager"


def test_variant_names_round_trip_compile_modes():
    assert [variant_name(r, m) for r, m in ((False, None), (True, None), (False, "default"), (True, "max-autotune"))] == [
        "eager", "rewrite", "compile", "rewrite+compile:max-autotune"]


def test_optimize_returns_the_picked_module():
    model, args, kwargs = build("gpt2")
    fast, report = optimize(model, args, example_kwargs=kwargs, config=OptimizeConfig(select=True, repeats=3, warmup=1))
    selection = report.selection
    assert [c.name for c in selection.candidates] == ["eager", "rewrite"]
    assert all(c.median_ms > 0 and c.eligible for c in selection.candidates)
    assert selection.summary in report.notes and report.compiled == "none"
    if selection.picked == "eager":
        assert fast is model  # returned unchanged
    else:
        assert fast is not model and report.latency.after_ms == selection.candidates[1].median_ms
    assert all(c.rounds == 5 and len([c.low, c.high]) == 2 for c in selection.candidates if c.median_ms is not None)
    assert report.to_json()["selection"]["picked"] == selection.picked


def test_select_times_compiled_variants(monkeypatch):
    compiled = []

    def fake_compile(module, mode=None):  # compiling for real on 2 CPU cores is too slow for a unit test
        compiled.append((module, mode))
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    model, args, kwargs = build("vit")
    model.train()
    modes = ("default", "max-autotune-no-cudagraphs")
    _, report = optimize(model, args, config=OptimizeConfig(select=True, compile=modes, repeats=2, warmup=0, rounds=2, check=False))
    assert [c.name for c in report.selection.candidates] == [
        "eager", "rewrite", "compile", "rewrite+compile", "compile:max-autotune-no-cudagraphs", "rewrite+compile:max-autotune-no-cudagraphs"]
    assert [mode for _, mode in compiled] == [None, None, "max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"]
    assert model.training  # timing ran in eval mode and restored the caller's mode
