"""`attnkit validate`: exit 0 when accuracy passes, 1 when it fails, a clear error for bad input."""

import dataclasses
import json

import pytest
import typer
from typer.testing import CliRunner

import attnkit.models
from attnkit.cli import validate as validate_cli
from attnkit.errors import InvalidArgumentError
from attnkit.ops import BACKENDS
from attnkit.ops.registry import register_backend, unregister_backend
from planted import TinyDecoder, tiny_inputs


@pytest.fixture
def app(monkeypatch):
    """The subcommand on its own app, with the zoo answering every name with the tiny model."""
    monkeypatch.setattr(attnkit.models, "build_model", lambda name, **_: attnkit.models.ZooModel(name, TinyDecoder(), tiny_inputs(), {}, "user", "user", ""))
    app = typer.Typer()
    app.callback()(lambda: None)
    validate_cli.register(app)
    return app


def test_passes_with_exit_0_and_writes_json_and_plots(app, tmp_path):
    result = CliRunner().invoke(app, ["validate", "user.module:tiny", "--quick", "--backends", "math,flash", "--seed", "3", "--device", "cpu", "--json", str(tmp_path / "r.json"), "--plots", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["seed"] == 3
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["user.module_tiny-float32-accuracy.png", "user.module_tiny-float32-latency.png"]


def test_fails_with_exit_1_when_a_backend_is_wrong(app):
    wrong = BACKENDS["math"].run

    def run(q, k, v, options):
        return wrong(q, k, v, dataclasses.replace(options, scale=options.scale * 1.5))

    register_backend("wrong_scale", lambda spec: None, run, summary="planted fault: scale off by 1.5x")
    try:
        result = CliRunner().invoke(app, ["validate", "user.module:tiny", "--quick", "--backends", "math,wrong_scale"])
    finally:
        unregister_backend("wrong_scale")
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "wrong_scale" in result.output
    assert "TypeError" not in result.output and "raised" not in result.output  # failed on accuracy, not by raising


def test_usage_errors(app):
    for option in ("--batch", "--repeats"):  # the attnkit app maps these to exit 2 (tests/cli/test_cli_errors.py)
        result = CliRunner().invoke(app, ["validate", "user.module:tiny", option, "0"])
        assert isinstance(result.exception, InvalidArgumentError) and str(result.exception).startswith(f"{option}: expected an integer")
    result = CliRunner().invoke(app, ["validate", "user.module:tiny", "--quick", "--dtype", "int8"])
    assert isinstance(result.exception, InvalidArgumentError) and "dtype" in str(result.exception)  # the attnkit app maps it to exit 2
