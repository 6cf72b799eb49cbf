"""`optimize` keeps every family's outputs and gradients (eval and train, fp32 and bf16 rules)."""

from __future__ import annotations

import inspect

import pytest
import torch

from attnkit.optimize import OptimizeConfig, optimize
from optimize_models import BUILDERS, REWRITES, build

pytestmark = pytest.mark.usefixtures("one_thread")

# sdpa (None/bool masks) for every family; eager (dense float masks) for the mask-carrying ones.
CASES = [(name, "sdpa") for name in BUILDERS] + [(name, "eager") for name in ("bert", "gpt2", "llama", "t5")]


@pytest.mark.parametrize("name,impl", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_equivalent_eval_and_train(name, impl):
    model, args, kwargs = build(name, impl)
    config = OptimizeConfig(dtype=torch.bfloat16 if impl == "sdpa" else None, measure=False)
    optimized, report = optimize(model, args, example_kwargs=kwargs, config=config)

    assert len(report.rewrites) == REWRITES[name] and report.kept, report.rewrites
    kinds = {(c.what, c.mode, c.dtype) for c in report.checks}
    assert {("outputs", "eval", "float32"), ("outputs", "train", "float32"), ("gradients", "train", "float32")} <= kinds
    if config.dtype is not None:
        assert ("gradients", "train", "bfloat16") in kinds
    assert report.passed, [c for c in report.checks if not c.passed]
    fp32 = [c for c in report.checks if c.dtype == "float32" and c.what in ("outputs", "gradients")]
    assert max(c.max_rel for c in fp32) < 1e-5, fp32


def _cache_keyword(model) -> str:
    """transformers >= 5.2x takes the cache as ``cache``, earlier 5.x as ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_kv_cache_decoding_matches(name):
    """Prefill then three decoding steps through the cache, against the original doing the same and the uncached truth."""
    model, args, _ = build(name)
    optimized, _ = optimize(model, args, config=OptimizeConfig(check=False, measure=False))
    ids = args[0]
    with torch.no_grad():
        truth = model(ids, use_cache=False).logits[:, -3:]
        results = []
        for m in (model, optimized):
            out = m(ids[:, :-3], use_cache=True)
            steps = []
            for position in range(ids.shape[1] - 3, ids.shape[1]):
                out = m(ids[:, position : position + 1], use_cache=True, **{_cache_keyword(m): _cache_of(out)})
                steps.append(out.logits)
            results.append(torch.cat(steps, dim=1))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1], truth, rtol=1e-4, atol=1e-4)


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
                decoder_input_ids=decoder_ids[:, :1], use_cache=True, **{_cache_keyword(m): _cache_of(out)},
            )  # fmt: skip
            results.append(step.last_hidden_state)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
