"""`bench_attention` on CPU with tiny shapes: the record set is complete and JSON-ready."""

import json

import torch
from typer.testing import CliRunner

from attnkit.bench.attention import AttentionBench, BenchRecord, BenchShape, ShapeSummary, bench_attention, suggest_rules
from attnkit.cli.main import app

GRID = [BenchShape(batch=1, heads=2, seq=32, head_dim=16, causal=causal, backward=b) for causal in (False, True) for b in (False, True)]


def test_records_every_backend_and_summarizes_auto():
    report = bench_attention(grid=GRID, backends=("flash", "math", "cudnn"), device="cpu", dtype=torch.float32, warmup=1, repeats=2)
    record = json.loads(json.dumps(report.to_json()))
    assert {"device", "torch", "date", "command", "dtype", "flops_convention", "records", "summaries"} <= set(record)
    assert len(record["records"]) == len(GRID) * 4  # auto + three backends
    by_backend = {}
    for row in record["records"]:
        by_backend.setdefault(row["backend"], []).append(row)
    assert all(row["skipped"] == "cudnn runs on cuda only, got device 'cpu'" for row in by_backend["cudnn"])
    assert all(row["tflops"] > 0 and row["median_ms"] > 0 for row in by_backend["math"])
    assert {row["chosen"] for row in by_backend["auto"]} == {"flash"}
    for summary in record["summaries"]:
        assert summary["best"] in ("flash", "math") and isinstance(summary["auto_within_tolerance"], bool)


def test_budget_skips_remaining_measurements():
    report = bench_attention(grid=GRID[:1], backends=("math",), device="cpu", dtype=torch.float32, repeats=1, budget_s=0.0)
    assert [r.skipped for r in report.records] == ["time budget spent"] * 2


def test_cli_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr("attnkit.cli.bench.default_grid", lambda **_: GRID[:2])
    args = ["bench", "attention", "--device", "cpu", "--backends", "math", "--repeats", "1", "--json", str(tmp_path / "b.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "attention TFLOP/s" in result.output
    assert len(json.loads((tmp_path / "b.json").read_text())["records"]) == 4


def test_suggest_rules_orders_by_measured_throughput():
    shapes = [BenchShape(1, 2, seq, 64, False, False) for seq in (1024, 2048)]
    tflops = {"flash": (300.0, 350.0), "cudnn": (310.0, 500.0), "efficient": (100.0, 150.0)}
    records = [BenchRecord(shape, name, median_ms=1.0, tflops=t[i]) for name, t in tflops.items() for i, shape in enumerate(shapes)]
    report = AttentionBench(device="NVIDIA H100", torch="2.11", date="2026-11-22T00:00", command="", dtype="bfloat16", flops_convention="")
    report.records = records + [BenchRecord(shape, "math", skipped="out of memory") for shape in shapes]
    report.summaries = [ShapeSummary(shape, None, None, None, None, None, None) for shape in shapes]
    (rule,) = suggest_rules(report)
    assert rule.order[:3] == ("cudnn", "flash", "efficient") and "math" in rule.order
    assert (rule.device, rule.causal, rule.requires_grad, rule.max_head_dim) == ("cuda", False, False, 64)
