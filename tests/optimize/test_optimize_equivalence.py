"""`optimize` keeps every family's outputs and gradients (eval and train, fp32 and bf16 rules)."""

from __future__ import annotations

import pytest
import torch

from attnkit.optimize import OptimizeConfig, optimize
from optimize_models import BUILDERS, REWRITES, build

# sdpa (None/bool masks) for every family; eager (dense float masks) for the mask-carrying ones.
CASES = [(name, "sdpa") for name in BUILDERS] + [(name, "eager") for name in ("bert", "gpt2", "llama", "t5")]


@pytest.mark.parametrize("name,impl", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_equivalent_eval_and_train(name, impl):
    model, args, kwargs = build(name, impl)
    config = OptimizeConfig(dtype=torch.bfloat16 if impl == "sdpa" else None, measure=False)
    optimized, report = optimize(model, args, example_kwargs=kwargs, config=config)

    assert len(report.rewrites) == REWRITES[name], report.rewrites
    kinds = {(c.what, c.mode, c.dtype) for c in report.checks}
    assert {("outputs", "eval", "float32"), ("outputs", "train", "float32"), ("gradients", "train", "float32")} <= kinds
    if config.dtype is not None:
        assert ("gradients", "train", "bfloat16") in kinds
    assert report.passed, [c for c in report.checks if not c.passed]
    fp32 = [c for c in report.checks if c.dtype == "float32"]
    assert max(c.max_rel for c in fp32) < 1e-5, fp32


def test_dropout_is_kept_in_training():
    model, args, kwargs = build("bert")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    optimized, report = optimize(model, args, example_kwargs=kwargs, config=OptimizeConfig(check=False, measure=False))
    assert {module.core.dropout_p for module in optimized.modules() if hasattr(module, "core")} == {0.5}
    optimized.train()
    first = optimized(*args, **kwargs).last_hidden_state
    second = optimized(*args, **kwargs).last_hidden_state
    assert not torch.equal(first, second)
    optimized.eval()
    assert torch.equal(optimized(*args, **kwargs).last_hidden_state, optimized(*args, **kwargs).last_hidden_state)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_kv_cache_decoding_matches(name):
    """Prefill then one decoding step through the cache, against the original doing the same."""
    model, args, _ = build(name)
    optimized, _ = optimize(model, args, config=OptimizeConfig(check=False, measure=False))
    ids = args[0]
    with torch.no_grad():
        results = []
        for m in (model, optimized):
            out = m(ids, use_cache=True)
            step = m(ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
            results.append(step.logits)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_t5_cross_attention_cache_matches():
    model, args, kwargs = build("t5")
    optimized, _ = optimize(model, args, example_kwargs=kwargs, config=OptimizeConfig(check=False, measure=False))
    mask, decoder_ids = kwargs["attention_mask"], kwargs["decoder_input_ids"]
    with torch.no_grad():
        results = []
        for m in (model, optimized):
            out = m(args[0], attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=True)
            step = m(
                encoder_outputs=(out.encoder_last_hidden_state,), attention_mask=mask,
                decoder_input_ids=decoder_ids[:, :1], past_key_values=out.past_key_values, use_cache=True,
            )  # fmt: skip
            results.append(step.last_hidden_state)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
