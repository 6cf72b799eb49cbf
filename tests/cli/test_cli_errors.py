"""Every bad command-line input: exit code 2, one message naming the option, no traceback, and
(for everything but the model's own builder) no model built.

Table rows are ``(args, option named in stderr)``; ``{tmp}`` is a folder holding the files below.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import attnkit.models
from attnkit.cli.main import app
from attnkit.errors import InvalidArgumentError

_ME = __name__  # user builders below are named f"{_ME}:function"
_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

# Rejected before build_model is called (build_model is replaced by a tripwire).
BEFORE_BUILD = [
    # analyze: model, dtype, hardware
    (["analyze", "no-such-model"], "MODEL"),
    (["analyze", "bert-bse"], "MODEL"),  # typo: the message suggests 'bert-base'
    (["analyze", "gpt2", "--dtype", "int8"], "--dtype"),
    (["analyze", "gpt2", "--hardware", "tpu"], "--hardware"),
    (["analyze", "gpt2", "--hardware", "{tmp}/missing.json"], "--hardware"),
    (["analyze", "gpt2", "--hardware", "{tmp}/malformed.json"], "--hardware"),
    (["analyze", "gpt2", "--hardware", "{tmp}/list.json"], "--hardware"),
    (["analyze", "gpt2", "--hardware", "{tmp}/measured.json"], "--hardware"),  # a JSON, but not a profile
    # analyze: --measured
    (["analyze", "gpt2", "--measured", "{tmp}/missing.json"], "--measured"),
    (["analyze", "gpt2", "--measured", "{tmp}/malformed.json"], "--measured"),
    (["analyze", "gpt2", "--measured", "{tmp}/profile.json"], "--measured"),  # a JSON, but not a profile run
    (["analyze", "gpt2", "--measured", "{tmp}/bad_records.json"], "--measured"),
    (["analyze", "gpt2", "--measured", "{tmp}"], "--measured"),
    # analyze: every output flag, unwritable and a directory
    (["analyze", "gpt2", "--json", "{tmp}/no-such-dir/r.json"], "--json"),
    (["analyze", "gpt2", "--json", "{tmp}"], "--json"),
    (["analyze", "gpt2", "--json", "{tmp}/measured.json/r.json"], "--json"),  # parent is a file
    (["analyze", "gpt2", "--json", "/proc/attnkit-r.json"], "--json"),  # unwritable even for root
    (["analyze", "gpt2", "--markdown", "{tmp}/no-such-dir/r.md"], "--markdown"),
    (["analyze", "gpt2", "--markdown", "{tmp}"], "--markdown"),
    (["analyze", "gpt2", "--html", "/proc/attnkit-r.html"], "--html"),
    (["analyze", "gpt2", "--html", "{tmp}"], "--html"),
    # analyze: sizes
    (["analyze", "gpt2", "--batch", "0"], "--batch"),
    (["analyze", "gpt2", "--seq", "0"], "--seq"),
    (["analyze", "llama-gqa", "--seq", "10000000"], "--seq"),
    (["analyze", "gpt2", "--batch", "10000000"], "--batch"),
    # optimize
    (["optimize", "no-such-model"], "MODEL"),
    (["optimize", "gpt2", "--device", "cuda:99"], "--device"),
    pytest.param(["optimize", "gpt2", "--device", "cuda"], "--device", marks=_NO_CUDA),
    (["optimize", "gpt2", "--device", "tpu"], "--device"),
    (["optimize", "gpt2", "--backend", "fastest"], "--backend"),
    (["optimize", "gpt2", "--compile-mode", "turbo"], "--compile-mode"),
    (["optimize", "gpt2", "--device", "cpu", "--no-select", "--compile-mode", "default", "--compile-mode", "max-autotune"], "--compile-mode"),
    (["optimize", "gpt2", "--fp8", "bogus"], "--fp8"),
    (["optimize", "gpt2", "--dtype", "int8"], "--dtype"),
    (["optimize", "gpt2", "--json", "{tmp}"], "--json"),
    (["optimize", "gpt2", "--json", "{tmp}/no-such-dir/r.json"], "--json"),
    (["optimize", "gpt2", "--batch", "0"], "--batch"),
    (["optimize", "llama-gqa", "--seq", "10000000"], "--seq"),
    # validate
    (["validate", "no-such-model"], "MODEL"),
    pytest.param(["validate", "gpt2", "--device", "cuda"], "--device", marks=_NO_CUDA),
    (["validate", "gpt2", "--device", "cuda:99"], "--device"),
    (["validate", "gpt2", "--repeats", "0"], "--repeats"),
    (["validate", "gpt2", "--batch", "0"], "--batch"),
    (["validate", "llama-gqa", "--seq", "10000000"], "--seq"),
    (["validate", "gpt2", "--dtype", "int8"], "--dtype"),
    (["validate", "gpt2", "--backends", "math,fastest"], "--backends"),
    (["validate", "gpt2", "--json", "{tmp}"], "--json"),
    (["validate", "gpt2", "--json", "/proc/attnkit-r.json"], "--json"),
    (["validate", "gpt2", "--plots", "{tmp}/measured.json"], "--plots"),  # a file, not a directory
    (["validate", "gpt2", "--plots", "{tmp}/no-such-dir/plots"], "--plots"),
    # bench attention
    (["bench", "attention", "--backends", "fastest"], "--backends"),
    (["bench", "attention", "--backends", "reference"], "--backends"),
    (["bench", "attention", "--dtype", "int8"], "--dtype"),
    (["bench", "attention", "--repeats", "0"], "--repeats"),
    (["bench", "attention", "--budget-s", "0"], "--budget-s"),
    (["bench", "attention", "--device", "cuda:99"], "--device"),
    (["bench", "attention", "--json", "{tmp}"], "--json"),
    # profile and calibrate
    (["profile", "no-such-model"], "MODEL"),
    (["profile", "gpt2", "--batch", "0"], "--batch"),
    (["profile", "gpt2", "--hardware", "{tmp}/missing.json"], "--hardware"),
    (["profile", "gpt2", "--json", "{tmp}/no-such-dir/r.json"], "--json"),
    (["calibrate", "--out", "{tmp}"], "--out"),
    (["calibrate", "--out", "{tmp}/no-such-dir/hw.json"], "--out"),
    # typer's own usage errors
    (["analyze"], "'model'"),
    (["analyze", "gpt2", "--no-such-option"], "--no-such-option"),
    (["no-such-command"], "no-such-command"),
]

# Rejected by the model's builder or the zoo's own limits: build_model runs, no weights are drawn.
IN_BUILD = [
    (["analyze", f"{_ME}:raising_builder"], f"{_ME}:raising_builder"),
    (["validate", f"{_ME}:raising_builder"], f"{_ME}:raising_builder"),
    (["analyze", f"{_ME}:wrong_type_builder"], f"{_ME}:wrong_type_builder"),
    (["optimize", f"{_ME}:wrong_type_builder"], f"{_ME}:wrong_type_builder"),
    (["analyze", "no_such_package.models:build"], "MODEL"),
    (["analyze", f"{_ME}:no_such_function"], "MODEL"),
    (["analyze", f"{_ME}:builder:extra"], "MODEL"),
    (["analyze", f"{_ME}:tiny_builder", "--batch", "2"], "--batch"),  # takes no batch_size
    (["analyze", "gpt2", "--seq", "2048"], "--seq"),  # past GPT-2's 1024 positions
    (["analyze", "vit_b_16", "--seq", "64"], "--seq"),  # images fix the sequence
]


def raising_builder():
    raise RuntimeError("checkpoint not found: weights.pt")


def wrong_type_builder():
    return nn.Linear(4, 4)  # a module without example inputs


def tiny_builder():
    return nn.Linear(4, 4), (torch.randn(1, 4),)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "malformed.json").write_text('{"records": [')
    (folder / "list.json").write_text("[1, 2]")
    (folder / "measured.json").write_text(json.dumps({"records": [{"model": "gpt2", "batch": 1, "mode": "eager", "measured_kernels": 3, "measured_ms": 1.0}]}))
    (folder / "profile.json").write_text(json.dumps({"key": "calibrated", "achievable_tflops": {"bf16": 700.0}}))
    (folder / "bad_records.json").write_text(json.dumps({"records": [{"measured_kernels": 3}]}))
    return folder


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if a model is built."""
    calls = []
    monkeypatch.setattr(attnkit.models, "build_model", lambda *args, **kwargs: calls.append(args))
    return calls


def _invoke(args, tmp):
    args = [arg.replace("{tmp}", str(tmp)) for arg in args]
    start = time.perf_counter()
    result = CliRunner().invoke(app, args)
    return result, time.perf_counter() - start


def _assert_clear_error(result, option):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert option in result.stderr, result.stderr
    assert "Traceback" not in result.output
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) <= 1 and (ours or "Usage:" in result.stderr), result.stderr  # one line, or typer's usage box


@pytest.mark.parametrize("args, option", BEFORE_BUILD)
def test_rejected_before_any_model_is_built(args, option, tmp, no_build):
    result, seconds = _invoke(args, tmp)
    _assert_clear_error(result, option)
    assert not no_build, "a model was built before the input was checked"
    assert seconds < 5


@pytest.mark.parametrize(
    "args, option, value",
    [
        (["analyze", "gpt2", "--seq", "-4"], "--seq", "-4"),
        (["optimize", "gpt2", "--batch", "-1"], "--batch", "-1"),
        (["profile", "gpt2", "--batch", "0"], "--batch", "0"),
        (["validate", "gpt2", "--repeats", "0"], "--repeats", "0"),
        (["bench", "attention", "--repeats", "0"], "--repeats", "0"),
    ],
)
def test_sizes_get_one_line_saying_what_came(args, option, value, tmp, no_build):
    result, _ = _invoke(args, tmp)
    _assert_clear_error(result, option)
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]  # our line, not typer's usage box
    assert line.startswith(f"error: {option}: expected an integer from 1 to") and line.endswith(f"got {value}."), line


@pytest.mark.parametrize("args, option", IN_BUILD)
def test_rejected_while_building(args, option, tmp):
    result, seconds = _invoke(args, tmp)
    _assert_clear_error(result, option)
    assert seconds < 10


def test_builder_error_keeps_the_users_message(tmp):
    result, _ = _invoke(["analyze", f"{_ME}:raising_builder"], tmp)
    assert "RuntimeError: checkpoint not found: weights.pt" in result.stderr


def test_unknown_model_suggests_the_close_name(tmp, no_build):
    result, _ = _invoke(["analyze", "bert-bse"], tmp)
    assert "Did you mean 'bert-base'?" in result.stderr


def test_outputs_are_not_touched_by_a_rejected_run(tmp, no_build):
    result, _ = _invoke(["analyze", "gpt2", "--json", "{tmp}/r.json", "--markdown", "{tmp}/no-such-dir/r.md"], tmp)
    _assert_clear_error(result, "--markdown")
    assert not (tmp / "r.json").exists()


def test_debug_shows_the_exception(tmp, no_build):
    result = CliRunner().invoke(app, ["--debug", "analyze", "gpt2", "--json", str(tmp)])
    assert isinstance(result.exception, InvalidArgumentError) and result.exception.parameter == "--json"


def test_internal_error_exits_1_with_one_line(tmp, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("planted bug")

    monkeypatch.setattr(attnkit.models, "build_model", broken)
    result, _ = _invoke(["validate", "gpt2", "--quick"], tmp)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith("internal error: ZeroDivisionError: planted bug")
    assert "--debug" in result.stderr
    debug = CliRunner().invoke(app, ["--debug", "validate", "gpt2", "--quick"])
    assert isinstance(debug.exception, ZeroDivisionError)


@pytest.mark.parametrize("args, option", [
    (["analyze", "gpt2", "--json", "/proc/attnkit-r.json"], "--json"),
    (["analyze", f"{_ME}:raising_builder"], f"{_ME}:raising_builder"),
])
def test_a_real_terminal_sees_no_traceback(args, option):
    """``python -m attnkit`` in a subprocess: exit 2 and one line on stderr."""
    here = os.path.dirname(__file__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, *sys.path])}
    done = subprocess.run([sys.executable, "-m", "attnkit", *args], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0], done.stderr
