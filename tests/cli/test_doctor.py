"""`attnkit doctor` and the library report behind it, on CPU."""

import json

import pytest
from typer.testing import CliRunner

from attnkit import doctor
from attnkit.cli.main import app


@pytest.fixture(scope="module")
def report():
    return doctor.diagnose()


def test_report_on_cpu(report):
    assert report.check("sdpa", "cpu:math").ok
    assert {c.name for c in report.checks if c.group == "sdpa"} >= {"cpu:math", "cpu:flash", "cpu:efficient", "cpu:cudnn"}
    assert {c.group for c in report.checks} == {"sdpa", "flex", "fp8", "distributed", "packages"}
    assert report.check("distributed", "gloo").ok
    for check in report.checks:
        assert check.detail and "\n" not in check.detail and "Traceback" not in check.detail
        assert check.status == "yes" or check.status.startswith("no: ")
    with pytest.raises(KeyError, match="cpu:math"):
        report.check("sdpa", "tpu:flash")


def test_failing_probe_becomes_a_reason():
    def broken():
        raise RuntimeError("kernel refused.\nlong explanation\n  File 'x.py', line 1")

    check = doctor._probe("sdpa", "cpu:broken", broken)
    assert not check.ok and check.status == "no: RuntimeError: kernel refused."


def test_cli_json(report):
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["torch"] == report.torch and len(data["gpus"]) == len(report.gpus)
    assert [(c["group"], c["name"]) for c in data["checks"]] == [(c.group, c.name) for c in report.checks]


def test_cli_table():
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "cpu:efficient" in result.stdout and "gloo" in result.stdout
