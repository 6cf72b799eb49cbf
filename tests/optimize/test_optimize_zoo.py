"""Every zoo model, full size: `optimize` rewrites its attention and passes the fp32 checks (eval and train).

Marked `zoo` (run by `make test-zoo`, not `make test`: 3-5 GB per model); the small-config tests in
test_optimize_equivalence.py and test_optimize_hf_models.py cover the same families in the default run.
ViT-L/16 is left out: it runs ViT-B/16's code path, and its real weights plus the fp32
and float64 copies the proof makes took one test worker past 4 GB.
"""

from __future__ import annotations

import pytest

from attnkit.models import build_model, list_models
from attnkit.optimize import OptimizeConfig, optimize

SEQ = {"vit_b_16": None}


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in list_models() if n != "vit_l_16"])
def test_zoo_model_equivalent(name):
    zoo = build_model(name, batch_size=1, seq_len=SEQ.get(name, 16))
    _, report = optimize(zoo.model, zoo.example_inputs, example_kwargs=zoo.example_kwargs, config=OptimizeConfig(measure=False))
    assert report.rewrites, report.skipped
    assert report.rewritten and not [s for s in report.skipped if "not nn.MultiheadAttention" in s.reason], report.skipped
    assert {("outputs", "eval"), ("outputs", "train"), ("gradients", "train")} <= {(c.what, c.mode) for c in report.checks}
    assert report.passed, [c for c in report.checks if not c.passed]
