"""`select`: the fastest proven variant wins, the original when nothing beats it, and the report shows every candidate."""

from __future__ import annotations

import pytest
import torch

from attnkit.optimize import Candidate, OptimizeConfig, optimize, pick
from optimize_models import build


@pytest.mark.parametrize(
    "timings, picked",
    [
        ({"eager": 2.0, "rewrite": 1.5, "compile": 1.2, "rewrite+compile": 1.0}, "rewrite+compile"),
        ({"eager": 2.0, "rewrite": 2.5}, "eager"),  # nothing faster: the original
        ({"eager": 2.0, "rewrite": 2.0}, "eager"),  # a tie keeps the original
        ({"eager": 2.0, "rewrite": None, "compile": 1.9}, "compile"),  # a variant that failed to run
    ],
)
def test_pick_fastest(timings, picked):
    candidates = [Candidate(name, ms, True) for name, ms in timings.items()]
    name, summary = pick(candidates)
    assert name == picked
    if picked == "eager":
        assert summary == "nothing beat the original: returned it unchanged"
    else:
        assert summary == f"picked {picked}: {timings['eager'] / timings[picked]:.2f}x eager"


def test_pick_only_proven_variants():
    candidates = [Candidate("eager", 2.0, True), Candidate("rewrite", 0.5, False), Candidate("compile", 1.5, True)]
    assert pick(candidates)[0] == "compile"


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
    assert report.to_json()["selection"]["picked"] == selection.picked


def test_select_times_compiled_variants(monkeypatch):
    compiled = []

    def fake_compile(module, mode=None):  # compiling for real on 2 CPU cores is too slow for a unit test
        compiled.append((module, mode))
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    model, args, kwargs = build("vit")
    model.train()
    _, report = optimize(model, args, config=OptimizeConfig(select=True, compile="max-autotune-no-cudagraphs", repeats=2, warmup=0, check=False))
    assert [c.name for c in report.selection.candidates] == ["eager", "rewrite", "compile", "rewrite+compile"]
    assert [mode for _, mode in compiled] == ["max-autotune-no-cudagraphs"] * 2
    assert model.training  # timing ran in eval mode and restored the caller's mode
