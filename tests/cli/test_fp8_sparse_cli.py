"""`attnkit fp8` and `attnkit sparse`: the plans they print and write, and one-line exit-2 errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from attnkit.cli.main import app
from attnkit.fp8 import load_speedup_table
from attnkit.fp8.report import float8_report


def wide_mlp(batch_size=1, seq_len=None):
    """A user model (MODEL as package.module:function) with GEMMs on the measured grid, and two that are not."""
    model = nn.Sequential(nn.Linear(4096, 8192), nn.Linear(8192, 4096, bias=False), nn.Linear(4096, 10), nn.Linear(4096, 64))
    return model, (torch.randn(batch_size, seq_len or 4096, 4096),)


def _invoke(*args):
    return CliRunner().invoke(app, list(args))


def _one_line_error(result, option):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {option}"), result.output


# -- fp8 --------------------------------------------------------------------------------------------------


def test_fp8_report_against_the_table_by_hand():
    with torch.device("meta"):
        model, _ = wide_mlp()
    report = float8_report(model, tokens=16384, recipe="tensorwise")
    rows = load_speedup_table()["speedup"]["tensorwise"]
    by_name = {layer.name: layer for layer in report.layers}
    s0, s1 = rows["16384x4096x8192"], rows["16384x8192x4096"]  # exact grid points
    assert by_name["0"].speedup == s0 and by_name["1"].speedup == s1
    assert by_name["0"].converted == (s0 >= 1.05) and by_name["1"].converted == (s1 >= 1.05)
    assert "not divisible by 16" in by_name["2"].reason and "below the measured grid" in by_name["3"].reason
    flops = {name: 6 * 16384 * layer.k * layer.n for name, layer in by_name.items()}
    assert all(by_name[name].flops == f for name, f in flops.items())
    fp8 = [name for name in ("0", "1") if by_name[name].converted]
    assert report.flop_share == pytest.approx(sum(flops[n] for n in fp8) / sum(flops.values()), rel=1e-12)
    time_after = sum(f / (by_name[n].speedup if n in fp8 else 1.0) for n, f in flops.items())
    assert report.speedup == pytest.approx(sum(flops.values()) / time_after, rel=1e-12)
    params = {"0": 4096 * 8192 + 8192, "1": 8192 * 4096, "2": 4096 * 10 + 10, "3": 4096 * 64 + 64}
    assert report.param_share == pytest.approx(sum(params[n] for n in fp8) / sum(params.values()), rel=1e-12)


def test_fp8_command_prints_and_writes_the_plan(tmp_path):
    out = tmp_path / "plan.json"
    result = _invoke("fp8", f"{__name__}:wide_mlp", "--batch", "4", "--json", str(out))
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    assert plan["tokens"] == 4 * 4096 and plan["recipe"] == "tensorwise" and len(plan["layers"]) == 4
    text = " ".join(result.output.split())
    assert "bf16: in/out" in text and "of GEMM FLOPs" in text
    with torch.device("meta"):
        expected = float8_report(wide_mlp()[0], tokens=16384)
    assert plan["speedup"] == pytest.approx(expected.speedup) and plan["flop_share"] == pytest.approx(expected.flop_share)


def test_fp8_command_on_a_zoo_model_keeps_small_gemms(tmp_path):
    out = tmp_path / "plan.json"
    result = _invoke("fp8", "llama-gqa", "--seq", "64", "--json", str(out))
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    assert len(plan["layers"]) == 4 * 7 + 1  # q, k, v, o, gate, up, down per layer, lm_head
    assert not any(layer["converted"] for layer in plan["layers"]) and plan["speedup"] == 1.0  # hidden 512: below the grid


@pytest.mark.parametrize("args, option", [
    (["--recipe", "fastest"], "--recipe"), (["--hardware", "a100"], "--hardware"), (["--batch", "0"], "--batch"),
    (["--json", "/nonexistent/dir/plan.json"], "--json"),
])
def test_fp8_bad_input_is_one_line_exit_2(args, option):
    _one_line_error(_invoke("fp8", "llama-gqa", *args), option)


# -- sparse ----------------------------------------------------------------------------------------------


def test_sparse_command_window_density_by_hand(tmp_path):
    out = tmp_path / "sparse.json"
    result = _invoke("sparse", "llama-gqa", "--seq", "1024", "--pattern", "window:256", "--json", str(out))
    assert result.exit_code == 0, result.output
    layers = json.loads(out.read_text())["layers"]
    assert len(layers) == 4
    # 8 query blocks of 128; a 256-token window reaches the own block and up to 2 before: 1 + 2 + 6 * 3 of 64.
    # Dense causal computes the 36 lower-triangle blocks.
    for layer in layers:
        assert layer["causal"] and layer["density"] == 21 / 64 and layer["dense_density"] == 36 / 64
        assert layer["saved"] == pytest.approx(1 - layer["flops"] / layer["dense_flops"])
        assert 0.3 < layer["saved"] < 0.5  # FLOPs count elements inside blocks: more than 1 - 21/36 is saved on the diagonal
    assert "attention FLOPs saved" in " ".join(result.output.split())


def test_sparse_command_topk_on_an_encoder(tmp_path):
    out = tmp_path / "sparse.json"
    result = _invoke("sparse", "bert-base", "--seq", "512", "--block", "64", "--pattern", "topk:0.25", "--json", str(out))
    assert result.exit_code == 0, result.output
    layers = json.loads(out.read_text())["layers"]
    # Not causal: 8 key blocks per row, ceil(0.25 * 8) = 2 kept (sink + diagonal are 2 as well).
    assert len(layers) == 12 and all(not l["causal"] and l["density"] == 0.25 and l["saved"] == 0.75 for l in layers)


@pytest.mark.parametrize("pattern", ["foo:3", "window:0", "window:x", "topk:1.5", "bigbird:1,2", "documents:-4", "window"])
def test_sparse_bad_pattern_is_one_line_exit_2(pattern):
    _one_line_error(_invoke("sparse", "llama-gqa", "--pattern", pattern), "--pattern")


def test_sparse_bad_block_is_one_line_exit_2():
    _one_line_error(_invoke("sparse", "llama-gqa", "--pattern", "window:64", "--block", "0"), "--block")
