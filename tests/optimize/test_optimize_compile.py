"""Optimized models trace with torch.compile: one graph once each call signature has chosen its backend."""

from __future__ import annotations

import pytest
import torch

from attnkit.optimize import OptimizeConfig, optimize
from attnkit.optimize.equivalence import _disable_dropout, float_tensors
from optimize_models import build


@pytest.mark.parametrize("name", ["llama", pytest.param("t5", marks=pytest.mark.slow)])
def test_compile_traces_one_graph_and_trains(name):
    model, args, kwargs = build(name)
    optimized, _ = optimize(model, args, example_kwargs=kwargs, config=OptimizeConfig(check=False, measure=False))
    optimized.train()
    _disable_dropout(optimized)  # compiled and eager must draw the same (no) dropout
    float_tensors(optimized(*args, **kwargs))[0].sum().backward()  # eager warm-up decides the backends
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(optimized)(*args, **kwargs)
    assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
    compiled = torch.compile(optimized, backend="aot_eager")
    out = float_tensors(compiled(*args, **kwargs))[0]
    out.sum().backward()
    torch.testing.assert_close(out, float_tensors(optimized(*args, **kwargs))[0], rtol=1e-5, atol=1e-5)
