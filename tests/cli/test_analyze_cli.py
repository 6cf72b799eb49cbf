"""`attnkit analyze`: writes JSON, Markdown and HTML for a model named package.module:function."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import BertConfig, BertModel
from typer.testing import CliRunner

from attnkit.cli.main import app
from attnkit.errors import InvalidArgumentError


def tiny_bert(batch_size=1, seq_len=None):
    """A 2-layer BERT for the CLI (the user-model form of MODEL)."""
    config = BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2)
    return BertModel(config).eval(), (torch.randint(0, 99, (batch_size, seq_len or 16)),)


def test_analyze_writes_every_format(tmp_path):
    paths = {fmt: tmp_path / f"report.{fmt}" for fmt in ("json", "md", "html")}
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps({"records": [
        {"model": "x", "batch": 3, "mode": "eager", "measured_kernels": 41.0, "measured_ms": 0.9},
    ]}))
    result = CliRunner().invoke(app, [
        "analyze", f"{__name__}:tiny_bert", "--hardware", "a100", "--dtype", "bf16", "--batch", "3", "--seq", "24",
        "--json", str(paths["json"]), "--markdown", str(paths["md"]), "--html", str(paths["html"]),
        "--measured", str(measured),
    ])
    assert result.exit_code == 0, result.output
    assert "Totals per mode" in result.output and "Attention (2 sites)" in result.output
    report = json.loads(paths["json"].read_text())
    assert report["schema_version"] and report["dtype"] == "bfloat16" and report["hardware"]["key"] == "a100-80gb"
    assert report["inputs"] == {"arg0": [3, 24]}
    assert report["measured"]["eager"]["kernels"] == 41.0
    assert "## Totals per mode" in paths["md"].read_text()
    assert '<svg id="roofline"' in paths["html"].read_text()


def test_bad_hardware_is_a_clear_error():
    result = CliRunner().invoke(app, ["analyze", f"{__name__}:tiny_bert", "--hardware", "tpu"])
    assert isinstance(result.exception, InvalidArgumentError) and "hardware" in str(result.exception)


@pytest.mark.timing
@pytest.mark.parametrize("model, limit_s", [("vit_b_16", 15), ("vit_l_16", 30)])
def test_cli_wall_time_on_cpu(model, limit_s):
    """The issue's budget for `attnkit analyze MODEL` on CPU, as a subprocess (imports included)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "attnkit", "analyze", model], check=True, capture_output=True, env=env)
    assert time.perf_counter() - start < limit_s
