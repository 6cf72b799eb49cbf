"""Honest verdicts: no attention is not a PASS, only accepted settings are recommended, and the
``default`` timing row runs for causal calls with Sq != Skv (issue 9's keyword bug)."""

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, BloomConfig, BloomModel
from typer.testing import CliRunner

import attnkit.models
from attnkit.cli.main import app
from attnkit.ops import AttentionSpec, attention
from attnkit.validate import ValidateConfig, validate
from attnkit.validate.accuracy import AccuracyResult
from attnkit.validate.performance import DEFAULT, PerfResult, _default_sdpa, time_layers
from attnkit.validate.recommend import recommend
from attnkit.validate.sites import AttentionLayer

_COMPATIBILITY = ValidateConfig(stages=("compatibility",), seed=0)


def _mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval(), (torch.randn(2, 16),)


def test_no_attention_is_its_own_verdict_not_a_pass():
    model, inputs = _mlp()
    report = validate(model, example_inputs=inputs, config=ValidateConfig.preset("quick", seed=0), device="cpu")
    assert report.attention_calls == 0 and not report.found_attention
    assert not report.passed and report.verdict == "NO ATTENTION"
    assert set(report.skipped) == {"accuracy", "performance", "compile_amp"}
    assert "NO ATTENTION: no attention found to validate in Sequential" in report.to_markdown()


def test_cli_exits_1_with_the_verdict_when_no_attention(monkeypatch):
    model, inputs = _mlp()
    monkeypatch.setattr(attnkit.models, "build_model", lambda name, **_: attnkit.models.ZooModel(name, model, inputs, {}, "user", "user", ""))
    result = CliRunner().invoke(app, ["validate", "user.mod:mlp", "--quick", "--seed", "0"])
    assert result.exit_code == 1, result.output
    assert "no attention found to validate in user.mod:mlp" in " ".join(result.output.split())


def _bert(attn_implementation):
    config = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, vocab_size=100,
                        attn_implementation=attn_implementation)
    return BertModel(config).eval()


def test_recommends_sdpa_only_where_transformers_accepts_it():
    ids = (torch.randint(0, 100, (1, 12)),)
    bert = validate(_bert("eager"), example_inputs=ids, config=_COMPATIBILITY, device="cpu")
    assert bert.passed and bert.attention_calls == 2
    assert any("load it with attn_implementation='sdpa'" in rec.text for rec in bert.recommendations)
    assert _bert("eager").get_correct_attn_implementation("sdpa") == "sdpa"  # transformers agrees

    bloom_config = dict(hidden_size=32, n_head=4, n_layer=2, vocab_size=100)
    with pytest.raises(ValueError, match="does not support"):  # what a user following an 'sdpa' advice would hit
        BloomModel(BloomConfig(**bloom_config, attn_implementation="sdpa"))
    bloom_model = BloomModel(BloomConfig(**bloom_config)).eval()
    bloom = validate(bloom_model, example_inputs=ids, example_kwargs={"use_cache": False}, config=_COMPATIBILITY, device="cpu")
    texts = [rec.text for rec in bloom.recommendations]
    assert not any("'sdpa'" in text for text in texts), texts
    assert any("the only implementation BloomModel offers" in text for text in texts), texts


def test_default_backend_times_a_causal_call_with_more_keys_than_queries():
    """Sq=5 queries over Skv=9 keys, causal (a decode step with a cache): the ``default`` row must run."""
    spec = AttentionSpec(batch=2, heads_q=4, heads_kv=2, seq_q=5, seq_kv=9, head_dim=8, causal=True)
    layer = AttentionLayer(["block.attn"], "sdpa", spec.to_json())
    config = ValidateConfig(stages=("performance",), warmup=0, repeats=1, time_model=False)
    rows = {r.backend: r for r in time_layers([layer], {"math": "math"}, config, torch.device("cpu"))}
    assert rows[DEFAULT].status == "ok", rows[DEFAULT].reason
    assert rows["math"].status == "ok" and rows[DEFAULT].median_ms > 0


def test_default_backend_computes_bottom_right_causal():
    """What ``default`` times is the layer's call: equal to attnkit's fp64 reference within fp32 rounding."""
    q, k, v = (torch.randn(2, h, s, 8, dtype=torch.float64) for h, s in ((4, 5), (2, 9), (2, 9)))
    expected = attention(q, k, v, causal=True, backend="reference")
    got = _default_sdpa(q.float(), k.float(), v.float(), mask=None, causal=True, scale=None)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    top_left = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (top_left - expected).abs().max() > 1e-2  # the two rules differ, so the check above means something


@pytest.mark.parametrize("backend, sdpa_kernel", [("cudnn", "sdpa_kernel(SDPBackend.CUDNN_ATTENTION)"), ("flex", None), ("chunked", None)])
def test_speed_advice_names_only_ways_that_exist(backend, sdpa_kernel):
    """``sdpa_kernel`` cannot select flex or chunked: advice for them must not mention it."""
    perf = [PerfResult("layer", name, "case", "l", 8, 1024, "ok", median_ms=ms, clock="cuda-events") for name, ms in ((DEFAULT, 2.0), (backend, 1.0))]
    recs = recommend([], [AccuracyResult(backend, "case", [], None, "pass")], perf, [], [])
    text = next(r.text for r in recs if f"Backend {backend!r}" in r.text)
    assert f"attnkit.ops.attention(..., backend={backend!r})" in text
    assert (sdpa_kernel in text) if sdpa_kernel else ("sdpa_kernel" not in text), text


class _NoFloat64(nn.Module):
    """SDPA self-attention behind a kernel that takes no float64 (as MoE layers' grouped_mm)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        if x.dtype == torch.float64:
            raise RuntimeError("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double")
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_a_model_without_float64_skips_its_whole_model_checks_instead_of_crashing():
    torch.manual_seed(0)
    config = ValidateConfig.preset("quick", seed=0)
    report = validate(_NoFloat64().eval(), example_inputs=(torch.randn(1, 12, 16),), config=config, device="cpu")
    assert report.attention_calls == 1 and report.passed, report.verdict
    assert report.accuracy and all(r.status != "fail" for r in report.accuracy)
    assert not any(r.case.startswith("model output") for r in report.accuracy)  # no whole-model row without a reference
    assert any("Whole-model output checks skipped: the model cannot run in float64" in note for note in report.model_notes)
    assert "cannot run in float64" in report.skipped["compile_amp"]


class _DataDependentAttention(nn.Module):
    """matmul + softmax attention behind a branch on a tensor's value: torch.export cannot capture it."""

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return torch.softmax(x @ x.transpose(-1, -2), dim=-1) @ x


class _SoftmaxHead(nn.Module):
    """A softmax that is not attention (a classifier's)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 4)

    def forward(self, x):
        return torch.softmax(self.linear(x), dim=-1)


def test_no_attention_says_why_graph_discovery_saw_none():
    config = ValidateConfig.preset("quick", seed=0)
    failed = validate(_DataDependentAttention(), example_inputs=(torch.randn(1, 6, 8),), config=config, device="cpu")
    assert failed.verdict == "NO ATTENTION"
    (note,) = [n for n in failed.model_notes if n.startswith("No attention layer found")]
    assert "graph capture failed, so attention written as matmul + softmax was not looked for" in note and "data-dependent" in note.lower()

    head = validate(_SoftmaxHead(), example_inputs=(torch.randn(2, 16),), config=config, device="cpu")
    assert head.verdict == "NO ATTENTION"
    assert any("the captured graph has 1 softmax op(s) that match no attention pattern" in n for n in head.model_notes)

    mlp, inputs = _mlp()
    mlp.config = type("Config", (), {"_attn_implementation": "eager"})()  # as a transformers state-space model's (Mamba)
    plain = validate(mlp, example_inputs=inputs, config=config, device="cpu")
    assert any(n.endswith("and graph capture found none.") for n in plain.model_notes)
    assert not any("attn_implementation" in n for n in plain.model_notes)  # no advice on how absent attention runs
