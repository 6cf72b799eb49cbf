"""`attnkit optimize MODEL`: prints the report, writes JSON, fails clearly on bad arguments."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from attnkit.cli.main import app
from attnkit.errors import InvalidArgumentError


def tiny_gpt2(batch_size=1, seq_len=None):
    """A 1-layer GPT-2 (the user-model form of MODEL)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=64, vocab_size=97, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval(), (torch.randint(0, 97, (batch_size, seq_len or 12)),)


def test_optimize_prints_and_writes_json(tmp_path):
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        app, ["optimize", "test_optimize_cli:tiny_gpt2", "--dtype", "bf16", "--batch", "2", "--device", "cpu", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "GPT2Attention" in result.output and "pass" in result.output
    record = json.loads(out.read_text())
    assert record["passed"] and record["config"]["dtype"] == "bfloat16" and len(record["rewrites"]) == 1
    assert record["rewrites"][0]["after"] == "GPT2Attention on attnkit"
    assert record["fusion"] == {"groups": [], "refused": []}  # GPT-2's c_attn is already one packed projection


def test_bad_dtype_is_a_clear_error():
    result = CliRunner().invoke(app, ["--debug", "optimize", "test_optimize_cli:tiny_gpt2", "--dtype", "int4", "--device", "cpu"])  # --debug: the exception itself
    assert isinstance(result.exception, InvalidArgumentError) and "dtype" in str(result.exception)


def mlp_only(batch_size=1, seq_len=None):
    """A model with no attention and no sibling projections: nothing for optimize to rewrite."""
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval(), (torch.randn(batch_size, 8),)


def test_nothing_rewritten_exits_1_and_says_so():
    result = CliRunner().invoke(app, ["optimize", "test_optimize_cli:mlp_only", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "nothing rewritten" in result.output
