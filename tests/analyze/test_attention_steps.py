"""analyze() runs the decomposition: each attention row lists its primitive steps and the fused kernel that absorbs them."""

import pytest
import torch
from transformers import BertConfig, BertModel

from attnkit.analyze import AnalysisReport, analyze
from attnkit.discover import capture, decompose_attention


def _report(attn_implementation: str) -> tuple[torch.nn.Module, dict, AnalysisReport]:
    config = BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
                        attn_implementation=attn_implementation)
    model = BertModel(config).eval()
    kwargs = {"input_ids": torch.randint(0, 99, (2, 16)), "attention_mask": torch.tensor([[1] * 16, [1] * 10 + [0] * 6])}
    return model, kwargs, analyze(model, (), kwargs, hardware="h100", dtype=torch.bfloat16)


def _fused(report: AnalysisReport, name: str):
    kernels = [k for k in report.mode("attention-aware").kernels if k.name == name]
    assert len(kernels) >= 1, f"no attention-aware kernel named {name!r}"
    return kernels[0]


def test_sdpa_sites_show_the_decomposition():
    model, kwargs, report = _report("sdpa")
    decomposed = decompose_attention(capture(model, (), kwargs))
    assert len(report.attention) == len(decomposed.replaced) == 2
    nodes = {node.name: node for node in decomposed.graph_module.graph.nodes}
    expected = [tuple(str(nodes[n].target).split(".")[-2] for n in new) for new in decomposed.replaced.values()]
    assert [row.steps for row in report.attention] == expected  # the decomposition's own nodes, in order
    for row in report.attention:
        # padding mask: where(bool mask) and the safe softmax (fully masked rows give 0, as SDPA does)
        assert row.steps == ("transpose", "matmul", "mul", "where", "_safe_softmax", "matmul")
        assert _fused(report, row.fused_kernel).category == "attention"


def test_hand_written_sites_show_their_chain_and_its_fused_kernel():
    _, _, report = _report("eager")
    assert len(report.attention) == 2
    for row in report.attention:
        compute = [step for step in row.steps if step in ("matmul", "mul", "add", "softmax")]
        assert compute == ["matmul", "mul", "add", "softmax", "matmul"]
        kernel = _fused(report, row.fused_kernel)
        assert kernel.category == "attention" and "softmax" in kernel.name
    eager = report.mode("eager").kernels  # the same steps run as separate kernels without attention fusion
    assert not any(k.category == "attention" and "matmul" in k.name and "softmax" in k.name for k in eager)


@pytest.mark.parametrize("form", ["markdown", "json"])
def test_steps_reach_the_report_outputs(form):
    _, _, report = _report("sdpa")
    row = report.attention[0]
    if form == "markdown":
        text = report.to_markdown()
        assert f"| {row.name} | {' -> '.join(row.steps)} | {row.fused_kernel} |" in text
    else:
        data = report.to_json()
        assert data["attention"][0]["steps"] == list(row.steps)
        assert AnalysisReport.from_json(data).attention == report.attention
