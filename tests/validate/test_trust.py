"""The trust tests: planted faulty backends must fail, correct backends must pass."""

import pytest
import torch

from attnkit.ops import AttentionSpec
from attnkit.validate import ValidateConfig, check_attention, validate
from attnkit.validate.accuracy import accuracy_cases
from attnkit.validate.sites import AttentionLayer
from planted import FAULTS, TinyDecoder, correct_custom, tiny_inputs

CORRECT = {"math": "math", "reference": "reference", "flash": "flash", "chunked": "chunked", "custom": correct_custom}


def _layers(dtype):
    """Layer groups with the features faults hide in: masks, causal (also Sq != Skv), GQA."""
    specs = {
        "bool_mask": AttentionSpec(batch=2, heads_q=4, seq_q=37, head_dim=16, dtype=dtype, mask="bool"),
        "additive_mask": AttentionSpec(batch=1, heads_q=4, seq_q=20, seq_kv=33, head_dim=16, dtype=dtype, mask="additive"),
        "causal_gqa": AttentionSpec(batch=2, heads_q=8, heads_kv=2, seq_q=29, head_dim=16, dtype=dtype, causal=True),
    }
    layers = [AttentionLayer([name], "sdpa", spec.to_json()) for name, spec in specs.items()]
    return layers + [AttentionLayer(["unscaled"], "sdpa", specs["bool_mask"].to_json(), scale=1.0)]  # T5 style


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def results(request):
    backends = {**CORRECT, **FAULTS}
    found = []
    for index, case in enumerate(accuracy_cases(_layers(request.param), max_batch=2)):
        found += check_attention(case, backends, seed=index, device="cpu")
    return found


def _by(results, backend):
    return [r for r in results if r.backend == backend]


@pytest.mark.parametrize("backend", sorted(CORRECT))
def test_correct_backends_pass(results, backend):
    checked = _by(results, backend)
    assert checked and all(r.status in ("pass", "skip") for r in checked), [(r.case, r.reason) for r in checked]
    assert any(r.status == "pass" for r in checked)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_planted_fault_is_flagged(results, fault):
    assert any(r.status == "fail" for r in _by(results, fault)), [(r.case, r.status, r.worst_ratio) for r in _by(results, fault)]


@pytest.mark.parametrize(
    "fault, where",
    [("dropped_mask", "mask"), ("causal_off_by_one", "causal"), ("gqa_misassigned", "H8/2"), ("causal_top_left", "S15x29"), ("ignores_scale", "scale=1")],
)
def test_fault_is_flagged_where_it_lives(results, fault, where):
    flagged = {r.case for r in _by(results, fault) if r.status == "fail"}
    assert flagged and all(where in case for case in flagged), flagged


def test_top_left_causal_is_right_when_square(results):
    """No false alarm: top-left and bottom-right causal agree when Sq == Skv."""
    square = [r for r in _by(results, "causal_top_left") if "S29x29" in r.case]
    assert square and all(r.status == "pass" for r in square)


def test_zeroed_k_gradient_fails_only_on_dk(results):
    for result in _by(results, "zero_grad_k"):
        assert result.errors["out"].passed and result.errors["dq"].passed and result.errors["dv"].passed
        assert not result.errors["dk"].passed and result.status == "fail"


def test_validate_flags_every_fault_on_a_model():
    """End to end: the layers are discovered from the model, not described by hand."""
    config = ValidateConfig.preset("quick", stages=("compatibility", "accuracy"), backends=("math", "chunked"), extra_backends=FAULTS)
    report = validate(TinyDecoder(), example_inputs=tiny_inputs(), config=config, device="cpu")
    assert not report.passed
    assert {r.backend for r in report.failures} == set(FAULTS) - {"ignores_scale"}  # TinyDecoder uses the default scale
    assert all(r.status == "pass" for r in report.accuracy if r.backend in ("math", "chunked"))
    model_level = {r.backend: r.status for r in report.accuracy if r.case.startswith("model output")}
    assert model_level["dropped_mask"] == "fail" and model_level["math"] == "pass"
    assert model_level["zero_grad_k"] == "pass"  # forward is exact; its gradient fault is caught per layer
