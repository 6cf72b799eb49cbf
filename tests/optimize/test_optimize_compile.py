"""Optimized models trace with torch.compile as one graph, without an eager call first, and train."""

from __future__ import annotations

import pytest
import torch

from attnkit.optimize import OptimizeConfig, optimize
from attnkit.optimize.compare import float_tensors
from attnkit.optimize.equivalence import _disable_dropout
from optimize_models import BUILDERS, build

FAST = OptimizeConfig(check=False, measure=False)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_no_graph_breaks(name, mode):
    """Zero graph breaks: the traced path chooses backends while tracing and keeps no Python-side state."""
    model, args, kwargs = build(name)
    optimized, _ = optimize(model, config=FAST)  # no example inputs: no backend decided before tracing
    optimized.train(mode == "train")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(optimized)(*args, **kwargs)
    assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", ["llama", pytest.param("t5", marks=pytest.mark.slow)])
def test_compiled_matches_eager_and_trains(name):
    model, args, kwargs = build(name)
    optimized, _ = optimize(model, args, example_kwargs=kwargs, config=FAST)
    optimized.train()
    _disable_dropout(optimized)  # compiled and eager must draw the same (no) dropout
    torch._dynamo.reset()
    compiled = torch.compile(optimized, backend="aot_eager")
    out = float_tensors(compiled(*args, **kwargs))[0]
    out.sum().backward()
    torch.testing.assert_close(out, float_tensors(optimized(*args, **kwargs))[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "t5"])
def test_fused_projections_no_graph_breaks(name):
    """With example inputs the projections are fused too; the fused model still traces as one graph."""
    model, args, kwargs = build(name)
    optimized, report = optimize(model, args, example_kwargs=kwargs, config=FAST)
    assert report.fusion.groups
    optimized.train()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(optimized)(*args, **kwargs)
    assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
