"""`optimize` on transformers models through transformers' attention interface.

Every family is proven equivalent by `optimize` itself (outputs, gradients, padding, dropout, cached
decoding, generate tokens); the tests also check that attnkit's attention function really serves
every call of the returned model, and plant faults the proof must catch.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnkit.optimize.hf_interface as hf_interface
from attnkit.optimize import OptimizeConfig, optimize, record_calls
from optimize_models import build

# Attention modules that run on attnkit, per model.
ATTENTIONS = {
    "distilbert": 2, "roberta": 2, "mistral": 2, "qwen2": 2, "gemma": 2, "gemma2-no-softcap": 2, "bart": 6, "whisper": 6,
    "clip-text": 2, "clip-vision": 2, "swin": 2, "gpt2": 2, "llama": 2, "t5": 6, "bert": 2, "vit": 2,
}  # fmt: skip
GENERATES = {"mistral", "qwen2", "gemma", "gemma2-no-softcap", "bart", "whisper", "gpt2", "llama"}
CACHED = GENERATES | {"t5"}
FAST = OptimizeConfig(measure=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _hf_rewrites(report):
    return [r for r in report.rewrites if r.family == "transformers"]


@pytest.mark.parametrize("backend", ["auto", "math"])
@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_family_proven_equivalent_and_served_by_attnkit(name, backend):
    model, args, kwargs = build(name)
    optimized, report = optimize(model, args, example_kwargs=kwargs, backend=backend, config=FAST)

    assert report.passed and report.kept, [c for c in report.checks if not c.passed]
    assert len(_hf_rewrites(report)) == ATTENTIONS[name] and report.rewritten >= ATTENTIONS[name], report.skipped
    kinds = {(c.what, c.mode) for c in report.checks}
    assert {("outputs", "eval"), ("outputs", "train"), ("gradients", "train")} <= kinds
    assert any(c.mode.startswith("prefill") for c in report.checks) == (name in CACHED), kinds
    assert (("tokens", "generate 32 greedy") in kinds) == (name in GENERATES), kinds
    assert all(c.max_rel <= 1e-5 for c in report.checks if c.what == "outputs"), report.checks

    optimized.eval()
    with record_calls() as calls, torch.no_grad():
        optimized(*args, **kwargs)
    assert len(calls) == ATTENTIONS[name] and {c.ran for c in calls} == {"attnkit"}, calls
    assert backend == "auto" or {c.backend for c in calls} == {"math"}
    with record_calls() as calls, torch.no_grad():
        model(*args, **kwargs)
    assert calls == []  # the original is left alone


def test_softcapping_falls_back_and_is_reported_not_rewritten():
    """Gemma2's soft-capping cannot run on attnkit.ops: every call runs transformers' own code, nothing counts as rewritten."""
    model, args, kwargs = build("gemma2", "eager")
    optimized, report = optimize(model, args, example_kwargs=kwargs, config=FAST)
    assert _hf_rewrites(report) == [] and report.rewritten == 0 and report.passed
    assert [s.path for s in report.skipped] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all("soft-capping" in s.reason for s in report.skipped)
    with record_calls() as calls, torch.no_grad():
        optimized(*args, **kwargs)
    assert len(calls) == 2 and {c.ran for c in calls} == {"eager"}


def _left_padded_llama(impl):
    model, args, _ = build("llama", impl)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0  # queries 0..3 of sequence 1 see no key at all
    return model, args, {"attention_mask": mask}


@pytest.mark.parametrize("backend", ["math", "auto"])
def test_eager_model_keeps_eager_masks(backend):
    """An eager model gets dense float masks: queries that see no key average the values, as eager does.

    The gradient of such a row is eager's only with an explicit softmax (``math``); torch's fused
    CPU kernel (auto's pick) returns the same outputs but another gradient there, so the proof
    refuses that rewrite and hands back the original.
    """
    model, args, kwargs = _left_padded_llama("eager")
    returned, report = optimize(model, args, example_kwargs=kwargs, backend=backend, config=FAST)
    failed = {(c.what, c.mode) for c in report.checks if not c.passed}
    if backend == "math":
        assert report.passed and returned.config._attn_implementation == "attnkit_eager_masks"
        assert {c.shape.split("mask=")[1].split()[0] for c in report.backends} == {"additive"}
    else:
        assert failed == {("gradients", "train")} and returned is model


def test_failed_proof_returns_the_original():
    """SDPA-form masks on that eager model give zeros for the masked queries: the proof fails and the original comes back."""
    model, args, kwargs = _left_padded_llama("eager")
    returned, report = optimize(model, args, example_kwargs=kwargs, config=OptimizeConfig(measure=False, hf_masks="sdpa"))
    assert not report.passed and not report.kept and report.rewritten == 0
    assert returned is model and model.config._attn_implementation == "eager"
    assert any("not kept" in note for note in report.notes)


def test_decode_only_fault_is_caught(monkeypatch):
    """A fault only in single-query calls (the cached decode path, issue 8's silent corruption) fails the proof."""
    model, args, kwargs = build("llama")
    real = hf_interface.attention

    def wrong_when_decoding(q, k, v, **options):
        out = real(q, k, v, **options)
        return out * 1.01 if q.shape[2] == 1 else out

    monkeypatch.setattr(hf_interface, "attention", wrong_when_decoding)
    returned, report = optimize(model, args, example_kwargs=kwargs, config=FAST)
    failed = {(c.what, c.mode) for c in report.checks if not c.passed}
    assert ("outputs", "prefill + 4 cached steps") in failed
    assert all(c.passed for c in report.checks if c.mode in ("eval", "train"))
    assert returned is model and model.config._attn_implementation == "sdpa"


def test_dropped_attention_dropout_is_caught(monkeypatch):
    model, args, kwargs = build("bert")
    real = hf_interface.attention
    monkeypatch.setattr(hf_interface, "attention", lambda q, k, v, **options: real(q, k, v, **{**options, "dropout_p": 0.0}))
    _, report = optimize(model, args, example_kwargs=kwargs, config=FAST)
    assert [(c.what, c.passed) for c in report.checks if c.what == "dropout"] == [("dropout", False)]


def test_attention_dropout_reaches_attnkit():
    model, args, kwargs = build("bert")
    optimized, report = optimize(model, args, example_kwargs=kwargs, config=FAST)
    assert any(c.what == "dropout" and c.passed for c in report.checks)
    optimized.train()
    with record_calls() as calls:
        first = optimized(*args, **kwargs).last_hidden_state
    assert {c.dropout_p for c in calls} == {0.1}
    assert not torch.equal(first, optimized(*args, **kwargs).last_hidden_state)
    optimized.eval()
    assert torch.equal(optimized(*args, **kwargs).last_hidden_state, optimized(*args, **kwargs).last_hidden_state)


def test_module_filter_keeps_transformers_attention():
    model, args, kwargs = build("bert")
    optimized, report = optimize(model, args, example_kwargs=kwargs, config=FAST, module_filter_fn=lambda m, fqn: "layer.0." in fqn)
    assert [r.path for r in _hf_rewrites(report)] == ["encoder.layer.0.attention.self"]
    assert [(s.path, s.reason) for s in report.skipped] == [("encoder.layer.1.attention.self", "module_filter_fn returned False")]
    with record_calls() as calls, torch.no_grad():
        optimized(*args, **kwargs)
    assert [c.ran for c in calls] == ["attnkit", "sdpa"]
    assert model.config._attn_implementation == "sdpa"  # not inplace


class _FusedSlice(nn.Module):
    """One output slice of a shared fused Linear: what a Q/K/V fusion pass leaves under ``q_proj``..."""

    def __init__(self, fused: nn.Linear, start: int, stop: int):
        super().__init__()
        self.fused, self.start, self.stop = fused, start, stop

    def forward(self, x):
        return self.fused(x)[..., self.start : self.stop]


def test_composes_with_fused_projections():
    """The interface receives q/k/v after the module's own projections, so fusing them underneath changes nothing."""
    model, args, kwargs = build("llama")
    optimized, _ = optimize(model, args, example_kwargs=kwargs, config=OptimizeConfig(check=False, measure=False))
    for layer in optimized.model.layers:
        attn = layer.self_attn
        parts = [attn.q_proj, attn.k_proj, attn.v_proj]
        fused = nn.Linear(32, sum(p.out_features for p in parts), bias=False)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
        bounds = torch.tensor([0] + [p.out_features for p in parts]).cumsum(0).tolist()
        attn.q_proj, attn.k_proj, attn.v_proj = (_FusedSlice(fused, a, b) for a, b in zip(bounds, bounds[1:]))
    with record_calls() as calls, torch.no_grad():
        got = optimized(*args, **kwargs).logits
        expected = model(*args, **kwargs).logits
    assert len(calls) == 2 and {c.ran for c in calls} == {"attnkit"}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_no_transformers_model_rewrites_nothing_and_says_so():
    class Scores(nn.Module):
        def forward(self, x):
            return torch.softmax(x @ x.transpose(1, 2), -1) @ x

    _, report = optimize(nn.Sequential(Scores()), (torch.randn(1, 4, 8),), config=FAST)
    assert report.rewritten == 0 and report.to_json()["rewritten"] == 0


def test_eager_fp32_mask_on_half_queries_keeps_eagers_fully_masked_rows():
    """An eager model hands an fp32 additive mask (finfo(float32).min where masked) to half-precision
    queries (autocast). Cast naively, finfo(float32).min becomes -inf and a fully masked query row comes
    out as zeros; eager averages the values there. Planted check: row 0 is fully masked."""
    import torch
    from torch import nn

    from attnkit.optimize.hf_interface import _attnkit_eager_masks_forward

    module = nn.Module()
    module.num_key_value_groups, module.is_causal = 1, False
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 0, :] = torch.finfo(torch.float32).min
    mask[..., 2, 3] = torch.finfo(torch.float32).min
    out, _ = _attnkit_eager_masks_forward(module, q, k, v, mask, scaling=8**-0.5)  # (B, S, H, D)
    torch.testing.assert_close(out[0, 0].float(), v[0, :, :, :].float().mean(dim=1), rtol=2e-2, atol=2e-2)
    scores = (q.float() @ k.float().transpose(-1, -2)) * 8**-0.5 + mask
    eager = (scores.softmax(-1) @ v.float()).transpose(1, 2)
    torch.testing.assert_close(out.float(), eager, rtol=3e-2, atol=3e-2)


def test_interface_calls_carry_the_site_record_graph_discovery_finds():
    """optimize's interface calls and analyze's graph sites describe the same attention with the same record."""
    from attnkit.discover import capture, find_attention

    model, args, kwargs = build("llama")
    graph = [site.record for site in find_attention(capture(model, args, kwargs))]
    optimized, _ = optimize(model, args, example_kwargs=kwargs, config=FAST)
    with record_calls() as calls, torch.no_grad():
        optimized(*args, **kwargs)
    assert len(calls) == len(graph) == 2
    batch, seq = args[0].shape
    shared = ("num_heads", "num_kv_heads", "head_dim_qk", "head_dim_v", "batch", "seq_q", "seq_kv", "dropout_p")
    for call, site in zip(calls, graph):
        assert [getattr(call.site, f) for f in shared] == [getattr(site, f) for f in shared] == [4, 2, 8, 8, batch, seq, seq, 0.0]
        assert call.shape == f"B={batch} Hq=4 Hkv=2 Sq={seq} Skv={seq} D=8 float32 mask=bool causal=False"
        assert call.site.spec(device="cpu", dtype=torch.float32).heads_kv == 2


@pytest.mark.parametrize("positions, checked", [(40, True), (20, False)])
def test_generate_check_keeps_the_prompt_within_the_position_table(positions, checked):
    """A prompt as long as the position table (GPT-2 at seq 1024) plus 32 new tokens would index
    past it: a device-side assert on CUDA. The check cuts the prompt, or says it cannot run."""
    import transformers

    from optimize_models import _TEXT

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=positions, bos_token_id=0, eos_token_id=0, **_TEXT)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(1, _TEXT["vocab_size"], (2, positions))
    _, report = optimize(model, (ids,), example_kwargs={"use_cache": False}, config=OptimizeConfig(check_training=False))
    kinds = {(c.what, c.mode) for c in report.checks}
    assert (("tokens", "generate 32 greedy") in kinds) == checked, (kinds, report.notes)
    expected = f"generate() checked on the first {positions - 32} prompt tokens" if checked else "generate() not checked: the model has 20 positions"
    assert any(note.startswith(expected) for note in report.notes), report.notes
    assert report.passed


def test_interface_prepares_each_forward_mask_once_and_drops_one_that_permits_everything(monkeypatch):
    """transformers hands one mask per forward to every layer: cast and checked once (one device sync),
    also in inference mode; an all-permitting mask runs unmasked (exact), a padding mask is kept."""
    conversions = []
    real = hf_interface._in_dtype
    monkeypatch.setattr(hf_interface, "_in_dtype", lambda mask, dtype: conversions.append(id(mask)) or real(mask, dtype))
    model, args, kwargs = build("bert", impl="eager")  # eager masks: a dense additive fp32 mask reaches every layer
    optimized, report = optimize(model, args, example_kwargs=kwargs, config=OptimizeConfig(check=False))
    assert model.config.num_hidden_layers == 2
    with torch.inference_mode():  # a padded batch: transformers' dense fp32 mask reaches both layers
        expected = model(*args, **kwargs).last_hidden_state
        conversions.clear()
        got = optimized(*args, **kwargs).last_hidden_state
    assert len(conversions) == 1, conversions  # once per forward, not once per layer
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert hf_interface._prepared_mask(torch.zeros(2, 1, 3, 3), torch.float32) is None  # permits everything
    blocked = torch.zeros(2, 1, 3, 3)
    blocked[0, 0, 1, 2] = torch.finfo(torch.float32).min
    assert hf_interface._prepared_mask(blocked, torch.float32) is blocked
    blocked.zero_()  # an in-place edit is seen through the version counter
    assert hf_interface._prepared_mask(blocked, torch.float32) is None
