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
