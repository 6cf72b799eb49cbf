"""`attnkit analyze`: writes JSON, Markdown and HTML for a model named package.module:function."""

import json
import os
import re
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


def tiny_llama(batch_size=1, seq_len=16):
    """A 2-layer Llama with GQA; the CLI builds it on the meta device for analysis."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 24)
    return LlamaForCausalLM(config).eval(), (torch.randint(0, 64, (batch_size, seq_len)),)


# Peak RSS of the command's own process: VmHWM (this program since exec) where /proc exists. getrusage's
# ru_maxrss survives fork + exec on Linux, so a child of a large pytest worker would report the worker's peak.
_MEASURE = (
    "import resource, sys, time; from pathlib import Path; from attnkit.cli.main import main; "
    "sys.argv = ['attnkit', *sys.argv[1:]]; start = time.perf_counter()\n"
    "try: main()\n"
    "except SystemExit as exit: code = exit.code\n"
    "else: code = 0\n"
    "status = Path('/proc/self/status')\n"
    "peak = [line.split()[1] for line in status.read_text().splitlines() if line.startswith('VmHWM')] if status.exists() else []\n"
    "rss = int(peak[0]) if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "print(f'CODE={code} SECONDS={time.perf_counter() - start:.2f} RSS_KB={rss}')"
)


def _run_measured(*args: str) -> tuple[int, float, float, str]:
    """Run `attnkit ARGS` in a fresh interpreter: (exit code, seconds, peak RSS in GB, output)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, env=env, timeout=600)
    match = re.search(r"CODE=(\S+) SECONDS=(\S+) RSS_KB=(\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    return int(match[1]), float(match[2]), int(match[3]) / 1e6, done.stdout + done.stderr


@pytest.mark.parametrize("seq", [131072, 10_000_000])
def test_long_sequences_are_analysed_without_data(tmp_path, seq):
    """Shapes only: a sequence whose masks alone would take terabytes costs what a short one does;
    an absurd one is analysed as cheaply or refused naming --seq, never allocated."""
    report = tmp_path / "report.json"
    code, _, rss_gb, output = _run_measured("analyze", f"{__name__}:tiny_llama", "--seq", str(seq), "--hardware", "cpu",
                                            "--json", str(report))
    assert rss_gb < 1.0, f"peak RSS {rss_gb:.2f} GB"
    if code == 2:  # the CLI's --seq ceiling (cli/_inputs.py MAX_SEQ)
        assert seq > 131072 and "--seq" in output and "Traceback" not in output
        return
    assert code == 0, output
    data = json.loads(report.read_text())
    assert data["inputs"] == {"arg0": [1, seq]}
    sites = data["attention"]
    assert len(sites) == 2 and all(site["causal"] and site["seq_kv"] == seq for site in sites)
    # 2 layers x causal attention 2*B*H*S*S*(D+D)/2 with H=4, D=8 dominate
    assert data["total_flops"] > 2 * 2 * 4 * seq * seq * 16 / 2


@pytest.mark.timing
def test_llama_gqa_at_128k_takes_the_time_of_1k_and_under_1_gb():
    """The issue's target: `attnkit analyze llama-gqa --seq 131072` in about the time of --seq 1024, under 1 GB."""
    short = _run_measured("analyze", "llama-gqa", "--seq", "1024", "--hardware", "cpu")
    long = _run_measured("analyze", "llama-gqa", "--seq", "131072", "--hardware", "cpu")
    assert short[0] == long[0] == 0, long[3]
    # Under 1 GB on a CPU build of torch (CI); a CUDA build maps its libraries into every process (about
    # 0.5 GB more there), so the bound is then the 1k run's own footprint plus what the shapes may add.
    assert long[1] < 1.5 * short[1] + 2 and long[2] < max(1.0, short[2] + 0.25)


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
    result = CliRunner().invoke(app, ["--debug", "analyze", f"{__name__}:tiny_bert", "--hardware", "tpu"])  # --debug: the exception itself
    assert isinstance(result.exception, InvalidArgumentError) and "hardware" in str(result.exception)


@pytest.mark.timing
@pytest.mark.parametrize("model, limit_s", [("vit_b_16", 15), ("vit_l_16", 30)])
def test_cli_wall_time_on_cpu(model, limit_s):
    """The issue's budget for `attnkit analyze MODEL` on CPU, as a subprocess (imports included)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "attnkit", "analyze", model], check=True, capture_output=True, env=env)
    assert time.perf_counter() - start < limit_s
