"""analyze() without data: a model and inputs on the ``meta`` device give the real-tensor analysis, with mask
values (causality of a materialised mask, padding) read on a small real-valued probe."""

import copy

import pytest
import torch

from attnkit.analyze import analyze
from attnkit.discover import mask_values
from attnkit.discover.attention import find_attention
from attnkit.discover.capture import capture

transformers = pytest.importorskip("transformers")


def _llama(attn="eager"):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    config._attn_implementation = attn
    return transformers.LlamaForCausalLM(config).eval()


def _t5():
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return transformers.T5ForConditionalGeneration(config).eval()


def _meta(model, inputs, kwargs):
    to_meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t  # noqa: E731
    return copy.deepcopy(model).to("meta"), tuple(map(to_meta, inputs)), {k: to_meta(v) for k, v in kwargs.items()}


def _cases():
    ids = torch.randint(0, 64, (2, 12))
    padded = torch.ones(2, 12, dtype=torch.long)
    padded[1, :4] = 0  # left padding in the second row
    return {
        "llama-eager": (_llama("eager"), (ids,), {}),
        "llama-sdpa-padded": (_llama("sdpa"), (ids,), {"attention_mask": padded}),
        "t5": (_t5(), (ids,), {"decoder_input_ids": ids[:, :7]}),
    }


def _facts(report):
    return [(row.name, row.kind, row.causal, row.mask, row.num_heads, row.num_kv_heads, row.seq_q, row.seq_kv)
            for row in report.attention]


@pytest.mark.parametrize("case", ["llama-eager", "llama-sdpa-padded", "t5"])
def test_meta_analysis_with_probe_equals_real_analysis(case):
    model, inputs, kwargs = _cases()[case]
    real = analyze(model, inputs, kwargs, hardware="a100")
    meta = analyze(*_meta(model, inputs, kwargs), hardware="a100", probe=lambda: (model, inputs, kwargs))
    assert (meta.total_flops, meta.dense_flops, meta.num_nodes) == (real.total_flops, real.dense_flops, real.num_nodes)
    assert _facts(meta) == _facts(real) and meta.attention
    for mode_real, mode_meta in zip(real.modes, meta.modes):
        assert (mode_meta.num_kernels, mode_meta.total_bytes) == (mode_real.num_kernels, mode_real.total_bytes)
        assert mode_meta.predicted_s == pytest.approx(mode_real.predicted_s, rel=1e-12)
    # a mask built from constants only (llama-eager's causal triangle) is evaluated on the spot; one built from
    # an input (padding) or a weight (T5's position bias) has no data on meta: the probe is read
    assert any("probe" in note for note in meta.notes) == (case != "llama-eager")


def test_without_values_or_probe_causality_comes_only_from_flags():
    """A causal mask combined with an input's padding has no values on ``meta``: the site says so instead of guessing."""
    model, inputs, kwargs = _cases()["llama-sdpa-padded"]
    blind = find_attention(capture(*_meta(model, inputs, kwargs)))
    assert {(site.causal, site.mask, site.mask_evidence) for site in blind} == {(False, "padding", "graph")}
    seen = find_attention(capture(*_meta(model, inputs, kwargs)), probe=capture(model, inputs, kwargs))
    assert {(site.causal, site.mask, site.mask_evidence) for site in seen} == {(True, "padding", "probe")}
    real = find_attention(capture(model, inputs, kwargs))
    assert {(site.causal, site.mask, site.mask_evidence) for site in real} == {(True, "padding", "values")}


def test_constant_masks_are_evaluated_without_a_probe():
    model, inputs, kwargs = _cases()["llama-eager"]
    sites = find_attention(capture(*_meta(model, inputs, kwargs)))
    assert {(site.causal, site.mask, site.mask_evidence) for site in sites} == {(True, "causal", "values")}


def test_masks_over_the_budget_are_read_on_the_probe(monkeypatch):
    model, inputs, kwargs = _cases()["llama-eager"]
    monkeypatch.setattr(mask_values, "MASK_VALUE_BUDGET", 100)  # 12 x 12 masks are now "too large"
    calls = []

    def probe():
        calls.append(1)
        return capture(model, (inputs[0][:, :5],), kwargs)

    sites = find_attention(capture(model, inputs, kwargs), probe=probe)
    assert len(calls) == 1 and {(s.causal, s.mask, s.mask_evidence, s.seq_q) for s in sites} == {(True, "causal", "probe", 12)}


def test_a_probe_of_another_structure_is_not_trusted():
    model, inputs, kwargs = _cases()["llama-sdpa-padded"]
    other = _llama("sdpa")
    other.model.layers = other.model.layers[:1]  # one site where the example has two
    sites = find_attention(capture(*_meta(model, inputs, kwargs)), probe=capture(other, inputs, kwargs))
    assert {site.mask_evidence for site in sites} == {"graph"}


def test_a_failing_probe_is_noted_not_fatal():
    model, inputs, kwargs = _cases()["llama-sdpa-padded"]

    def probe():
        raise RuntimeError("no weights here")

    report = analyze(*_meta(model, inputs, kwargs), hardware="a100", probe=probe)
    assert any("probe failed (RuntimeError: no weights here)" in note for note in report.notes)
    assert any("mask_evidence='graph'" in note for note in report.notes)


def test_zoo_on_meta_builds_nothing_and_counts_the_same(captured_zoo):
    """build_model(device="meta") allocates no weights; its capture counts what the real zoo model's does."""
    from attnkit.analyze.flops import count_ops
    from attnkit.models import build_model

    zoo = build_model("vit_b_16", batch_size=2, device="meta")
    assert all(p.is_meta for p in zoo.model.parameters()) and zoo.example_inputs[0].is_meta
    meta_ops = count_ops(capture(zoo.model, zoo.example_inputs).graph_module.graph, torch.float32)
    _, real, _ = captured_zoo("vit_b_16")
    real_ops = count_ops(real.graph_module.graph, torch.float32)
    assert [(o.op, o.flops, o.bytes_read, o.bytes_written) for o in meta_ops] == \
        [(o.op, o.flops, o.bytes_read, o.bytes_written) for o in real_ops]
