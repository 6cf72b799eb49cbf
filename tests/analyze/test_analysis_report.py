"""AnalysisReport: versioned JSON round trip, Markdown, terminal rendering; analyze() on a small model."""

import json

import pytest
import torch
from rich.console import Console
from transformers import BertConfig, BertModel

from attnkit.errors import InvalidArgumentError
from attnkit.analyze import SCHEMA_VERSION, AnalysisReport, analyze, render_report
from attnkit.analyze.report import ModeSummary

_LAYERS = 2


@pytest.fixture(scope="module")
def report():
    config = BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=_LAYERS)
    model = BertModel(config).eval()
    measured = {"eager": {"kernels": 40, "latency_ms": 1.5, "batch": 2}}
    return analyze(model, (), {"input_ids": torch.randint(0, 99, (2, 16))}, hardware="h100", dtype=torch.bfloat16,
                   name="tiny-bert", measured=measured)


def test_report_contents(report):
    assert [m.mode for m in report.modes] == ["eager", "compiled", "attention-aware"]
    assert len(report.attention) == _LAYERS and report.attention[0].num_heads == 4
    assert report.dtype == "bfloat16" and report.hardware["key"] == "h100-sxm"
    assert report.total_flops == report.dense_flops == report.modes[0].total_flops
    assert "2 FLOPs per multiply-add" in report.flop_convention and "causal attention halved" in report.flop_convention
    steps = [s.step for s in report.savings]
    assert steps[-1] == "Q/K/V projection merge" and report.savings[-1].kernels_saved == 2 * _LAYERS
    assert sum(report.layer_times("compiled").values()) == pytest.approx(report.mode("compiled").device_s)
    assert report.inputs == {"input_ids": [2, 16]}
    assert set(report.seconds) == {"capture", "find_attention", "decompose", "partition_and_cost"}
    with pytest.raises(KeyError, match="mode"):
        report.mode("fused")


def test_json_round_trip_with_schema_version(report):
    data = json.loads(json.dumps(report.to_json()))
    assert data["schema_version"] == SCHEMA_VERSION
    assert {"model", "modes", "attention", "savings", "measured", "flop_convention"} <= set(data)
    kernel = data["modes"][0]["kernels"][0]
    assert {"name", "ops", "flops", "bytes", "intensity", "bound", "time_s", "layer"} <= set(kernel)
    again = AnalysisReport.from_json(json.dumps(data))
    assert again == report
    assert isinstance(again.modes[0], ModeSummary)


def test_incompatible_schema_is_rejected(report):
    data = {**report.to_json(), "schema_version": "2.0"}
    with pytest.raises(InvalidArgumentError, match="schema_version"):
        AnalysisReport.from_json(data)


def test_markdown_and_terminal(report):
    text = report.to_markdown()
    for heading in ("## Totals per mode", "## What each fusion saves", "## Attention", "## Top kernels"):
        assert heading in text
    assert "| eager | " in text and "| 40 | 1.500 |" in text
    console = Console(record=True, width=200)
    render_report(report, console)
    shown = console.export_text()
    assert "tiny-bert" in shown and "encoder.layer.1.attention.self" in shown and "attention-aware" in shown
    assert "AnalysisReport('tiny-bert'" in repr(report)


def test_profile_records_feed_measured_numbers(tmp_path):
    from attnkit.measure.profile import ProfileRecord, ProfileResult, load_measured

    records = (ProfileRecord("gpt2", 64, "bfloat16", "eager", 110, 100.0, 9.0, 10.0),
               ProfileRecord("gpt2", 64, "bfloat16", "compiled", 90, None, 5.0, None, "skipped: time budget spent"))
    assert records[0].kernel_error == pytest.approx(0.1) and records[0].latency_error == pytest.approx(-0.1)
    assert records[1].kernel_error is None
    result = ProfileResult("NVIDIA H100", "2.11", "2026-11-22", "h100", records, command="run_profile.py")
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(result.to_json()))
    assert load_measured(path, "gpt2", 64) == {
        "eager": {"kernels": 100.0, "latency_ms": 10.0, "batch": 64, "device": "NVIDIA H100"}}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_profile_without_a_gpu_measures_cpu_latency():
    """Without CUDA, profile times eager forwards on this CPU (no kernel counts) beside the predictions."""
    from attnkit.measure import load_hardware, profile_models

    result = profile_models(["tests.cli.test_analyze_cli:tiny_bert"], batches=(1,), dtype=torch.float32,
                            hardware=load_hardware("cpu"), modes=("eager",), log=lambda _: None)
    (record,) = result.records
    assert "threads)" in result.device and record.note == ""
    assert record.measured_kernels is None and record.measured_ms > 0 and record.predicted_ms > 0


def test_analyze_never_measures():
    """``analyze`` sits below ``measure``: this machine's profile is resolved first, by ``measure.load_hardware``."""
    with pytest.raises(InvalidArgumentError, match=r"load_hardware\('this'\)"):
        analyze(torch.nn.Linear(4, 4), torch.randn(1, 4), hardware="this")


def test_markdown_terminal_and_html_show_the_same_tables(report):
    from attnkit.analyze import to_html

    tables = report.tables(top=3)
    assert [len(rows) for _, _, rows in tables] == [len(report.modes), len(report.savings), len(report.attention),
                                                    len(report.attention), 3]
    markdown, page = report.to_markdown(), to_html(report)
    console = Console(record=True, width=250)
    render_report(report, console, top=3)
    shown = console.export_text()
    for title, header, rows in tables:
        assert f"## {title}" in markdown and title in shown and f">{title}</h2>" in page
        for row in rows:
            assert "| " + " | ".join(row) + " |" in markdown
            assert all(cell in shown for cell in row if cell)


def test_rows_derive_their_shared_fields_from_the_cost_model():
    from dataclasses import fields

    from attnkit.analyze.cost import KernelCost, ModeCost
    from attnkit.analyze.partition import Kernel
    from attnkit.analyze.report import KernelRow

    kernel = Kernel("mm", "gemm", ("mm_1",), 4096, 1024, 512, "h.0", seq_kv=7)
    row = KernelRow.of(kernel, KernelCost(2e-6, 3e-6, 1e-6, "memory"), "gemm")
    assert (row.name, row.layer, row.ops, row.weight_bytes, row.intensity) == ("mm", "h.0", ("mm_1",), 512, 4.0)
    assert row.time_s == pytest.approx(4e-6) and row.bound == "memory" and row.group == "gemm"
    cost = ModeCost("eager", 1, 4096, 1024, 4e-6, 9e-6, 5e-6, (KernelCost(2e-6, 3e-6, 1e-6, "memory"),))
    summary = ModeSummary.of(cost, (row,))
    shared = {f.name for f in fields(ModeSummary)} & {f.name for f in fields(ModeCost)} - {"kernels"}
    assert shared == {"mode", "num_kernels", "total_flops", "total_bytes", "device_s", "host_s", "host_busy_s"}
    assert all(getattr(summary, name) == getattr(cost, name) for name in shared)
    assert (summary.predicted_s, summary.limiter, summary.kernels) == (cost.predicted_s, cost.limiter, (row,))


def test_softmax_outside_any_attention_is_noted(report):
    assert not any("softmax op(s) belong to no attention" in note for note in report.notes)  # BERT's are all attention
    head = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Softmax(dim=-1))
    noted = analyze(head, torch.randn(2, 8), hardware="h100")
    assert not noted.attention
    assert any(note.startswith("1 softmax op(s) belong to no attention found here") for note in noted.notes)
