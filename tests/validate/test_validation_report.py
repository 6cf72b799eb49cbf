"""The report round-trips through JSON, renders, plots; the config checks its arguments."""

import json

import pytest
import torch

from attnkit.errors import InvalidArgumentError
from attnkit.validate import SCHEMA, ValidateConfig, ValidationReport, markdown, render, save_plots, validate
from planted import TinyDecoder, scale_one_over_d, tiny_inputs


@pytest.fixture(scope="module")
def report():
    config = ValidateConfig.preset("quick", backends=("math", "flash"), extra_backends={"bad": scale_one_over_d}, repeats=3)
    return validate(TinyDecoder(), example_inputs=tiny_inputs(), config=config, device="cpu")


def test_every_stage_ran_and_is_marked_cpu(report):
    assert report.environment.device == "cpu" and report.layers and report.accuracy and report.compile_amp
    layer_times = [r for r in report.performance if r.scope == "layer" and r.status == "ok"]
    assert layer_times and all(r.clock == "cpu-wall" and r.peak_mem_mb is None and r.tflops > 0 for r in layer_times)
    assert {r.backend for r in layer_times} >= {"default", "math", "flash", "bad"}
    assert set(report.stage_seconds) == {"load", "compatibility", "accuracy", "performance", "compile_amp"}
    assert [c.check for c in report.compile_amp] == ["autocast:bfloat16"] and report.compile_amp[0].status == "pass"


def test_failing_backend_leads_the_recommendations(report):
    assert not report.passed and {r.backend for r in report.failures} == {"bad"}
    assert report.recommendations[0].kind == "fix" and "'bad'" in report.recommendations[0].text


def test_json_round_trip(report, tmp_path):
    path = report.save(tmp_path / "r.json")
    record = json.loads(path.read_text())
    assert record["schema"] == SCHEMA and record["seed"] == report.seed
    loaded = ValidationReport.load(path)
    assert loaded.to_json() == report.to_json() and loaded.passed == report.passed
    assert loaded.accuracy[0].errors["out"].max_abs == report.accuracy[0].errors["out"].max_abs


def test_load_rejects_another_schema():
    with pytest.raises(InvalidArgumentError, match="schema"):
        ValidationReport.from_json({"schema": "attnkit.validate/0"})


def test_markdown_render_and_plots(report, tmp_path, capsys):
    text = markdown(report)
    assert text.startswith("# attnkit validate") and "FAIL" in text and "| bad |" in text
    render(report)
    assert "FAIL" in capsys.readouterr().out
    names = sorted(p.name for p in save_plots(report, tmp_path))
    assert names == ["TinyDecoder-float32-accuracy.png", "TinyDecoder-float32-latency.png"]  # no memory plot on CPU


def test_inputs_are_fresh_unless_seeded():
    config = ValidateConfig.preset("quick", stages=("compatibility", "accuracy"), backends=("math",), model_output=False)
    first, second = (validate(TinyDecoder(), example_inputs=tiny_inputs(), config=config, device="cpu") for _ in range(2))
    assert first.seed != second.seed
    seeded = ValidateConfig.preset("quick", stages=("compatibility", "accuracy"), backends=("chunked",), model_output=False, seed=7)
    a, b = (validate(TinyDecoder(), example_inputs=tiny_inputs(), config=seeded, device="cpu") for _ in range(2))
    assert [r.errors["dq"].max_abs for r in a.accuracy] == [r.errors["dq"].max_abs for r in b.accuracy]


@pytest.mark.parametrize(
    "kwargs, parameter",
    [({"stages": ("speed",)}, "stages"), ({"tolerance_factor": 0.5}, "tolerance_factor"), ({"amp_dtypes": ("float32",)}, "amp_dtypes")],
)
def test_config_names_the_bad_parameter(kwargs, parameter):
    with pytest.raises(InvalidArgumentError, match=parameter):
        ValidateConfig(**kwargs)


def test_unknown_preset_and_backend():
    with pytest.raises(InvalidArgumentError, match="preset"):
        ValidateConfig.preset("fast")
    with pytest.raises(InvalidArgumentError, match="backends"):
        validate(TinyDecoder(), example_inputs=tiny_inputs(), config=ValidateConfig(backends=("flashy",)))


def test_compile_is_skipped_on_cpu_with_a_reason_or_runs_when_asked():
    from attnkit.validate.accuracy import reference_output
    from attnkit.validate.compile_amp import check_compile

    model, inputs = TinyDecoder(), tiny_inputs()
    reference = reference_output(model, inputs, {})
    skipped = check_compile(model, inputs, {}, reference, torch.float32, ValidateConfig(), torch.device("cpu"))
    assert [r.status for r in skipped] == ["skip"] and "cpu" in skipped[0].reason
    ran = check_compile(model, inputs, {}, reference, torch.float32, ValidateConfig(compile_backends=("eager",), compile_on_cpu=True, repeats=2), torch.device("cpu"))
    assert ran[0].status == "pass" and ran[0].first_call_s > 0, ran[0].reason
