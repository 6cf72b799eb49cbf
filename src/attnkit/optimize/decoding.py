"""The decoder paths of the equivalence proof: prefill then cached decode steps, and greedy ``generate()``.

Both run in fp32 (no TF32) on copies of the models, in eval mode:

- **cached decode**: the model's token ids are split into a prefill and ``_STEPS`` single-token
  steps that each feed the cache the previous call returned (for encoder-decoders the decoder ids,
  given or drawn at random, are split, and the encoder inputs are passed at every step); every
  step's outputs must match the original's doing the same, within ``rtol * max|orig|``;
- **generate**: ``GenerationMixin.generate`` (the library's own greedy loop, not a model's override
  such as Whisper's long-form one) for ``_NEW_TOKENS`` new tokens with end-of-sequence suppressed;
  the token ids must be identical.

The cache keyword is read from ``forward``'s signature (``cache`` in transformers >= 5.2x,
``past_key_values`` before), never from a version number.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn

from attnkit.optimize.compare import float_tensors, fp32_check, full_fp32, named_inputs
from attnkit.optimize.report import Check
from attnkit.utils.trees import cast_floating

__all__ = ["decoding_checks"]

_STEPS = 4
_NEW_TOKENS = 32
_NOT_FOR_GENERATE = ("use_cache", "labels", "decoder_input_ids", "decoder_attention_mask", "return_dict", "cache", "past_key_values")


def _cache_keyword(model: nn.Module) -> str | None:
    parameters = inspect.signature(model.forward).parameters
    if "use_cache" not in parameters:
        return None
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _returned_cache(output: Any):
    if not isinstance(output, dict):
        return None
    return next((output[key] for key in ("cache", "past_key_values") if key in output), None)


def decoding_checks(original: nn.Module, optimized: nn.Module, args: tuple, kwargs: dict, *, rtol: float, seed: int = 0) -> tuple[list[Check], list[str]]:
    """Cached-decode and ``generate()`` checks for decoders (none for other models), and notes on
    what could not be checked."""
    keyword = _cache_keyword(original)
    named = named_inputs(original, args, kwargs)
    if keyword is None or named is None:
        return [], []
    checks: list[Check] = []
    notes: list[str] = []
    plan = _plan(original, named, keyword, seed)
    if plan is not None:
        try:
            reference = _decode(original, plan, keyword, seed)
        except Exception as error:  # noqa: BLE001 - the original cannot decode this way: nothing to compare
            notes.append(f"cached decoding not checked: the original raised {type(error).__name__}: {error}")
        else:
            if reference is not None:
                checks.append(_compare_decode(optimized, plan, keyword, seed, reference, rtol))
    if hasattr(original, "can_generate") and original.can_generate():
        checks += _generate_check(original, optimized, named, seed, notes)
    return checks, notes


def _plan(model: nn.Module, named: dict, keyword: str, seed: int) -> dict | None:
    """What to feed: ``base`` inputs kept at every call, the ids to split and their keyword."""
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    key = "decoder_input_ids" if encoder_decoder else "input_ids"
    ids = named.get(key)
    if ids is None and encoder_decoder:
        config = model.config
        start = next((t for t in (config.decoder_start_token_id, config.pad_token_id, 0) if isinstance(t, int)), 0)
        batch = next(v.shape[0] for v in named.values() if isinstance(v, torch.Tensor))
        generator = torch.Generator().manual_seed(seed)
        vocab = model.config.get_text_config().vocab_size
        ids = torch.cat([torch.full((batch, 1), start), torch.randint(0, vocab, (batch, _STEPS), generator=generator)], dim=1)
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point() and ids.shape[1] > 1):
        return None
    base = {k: v for k, v in named.items() if k not in (key, keyword, "use_cache", "labels", "decoder_attention_mask")}
    mask = None
    if not encoder_decoder:
        mask = base.pop("attention_mask", None)
        # Other per-token inputs (position or token-type ids) would need slicing; both models go without them.
        base = {k: v for k, v in base.items() if not (isinstance(v, torch.Tensor) and v.shape[:2] == ids.shape)}
    steps = min(_STEPS, ids.shape[1] - 1)
    return {"base": base, "key": key, "ids": ids.to(_device(model)), "mask": mask, "steps": steps}


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _decode(model: nn.Module, plan: dict, keyword: str, seed: int) -> list[torch.Tensor] | None:
    """Every float output of the prefill and of each cached step (None when no cache comes back)."""
    model = copy.deepcopy(model).float().eval()
    ids, mask, key, steps = plan["ids"], plan["mask"], plan["key"], plan["steps"]
    base = cast_floating(plan["base"], torch.float32)
    prefill = ids.shape[1] - steps
    outputs: list[torch.Tensor] = []
    with full_fp32(seed), torch.no_grad():
        masked = {} if mask is None else {"attention_mask": mask[:, :prefill]}
        out = model(**base, **masked, **{key: ids[:, :prefill]}, use_cache=True)
        cache = _returned_cache(out)
        if cache is None:
            return None
        outputs += float_tensors(out)
        for position in range(prefill, ids.shape[1]):
            masked = {} if mask is None else {"attention_mask": mask[:, : position + 1]}
            out = model(**base, **masked, **{key: ids[:, position : position + 1], keyword: cache}, use_cache=True)
            cache = _returned_cache(out)
            outputs += float_tensors(out)
    return outputs


def _compare_decode(optimized: nn.Module, plan: dict, keyword: str, seed: int, reference: list[torch.Tensor], rtol: float) -> Check:
    mode = f"prefill + {plan['steps']} cached steps"
    try:
        got = _decode(optimized, plan, keyword, seed)
    except Exception as error:  # noqa: BLE001 - a rewrite that cannot decode fails its proof
        return Check("outputs", mode, "float32", float("inf"), float("inf"), rtol, f"raised {type(error).__name__}: {error}", False, ratio=float("inf"))
    if got is None or len(got) != len(reference) or any(a.shape != b.shape for a, b in zip(got, reference)):
        return Check("outputs", mode, "float32", float("inf"), float("inf"), rtol, "different outputs or no cache returned", False, ratio=float("inf"))
    return fp32_check("outputs", mode, got, reference, rtol)


def _generate(model: nn.Module, inputs: dict, seed: int) -> torch.Tensor:
    from transformers import GenerationMixin

    model = copy.deepcopy(model).float().eval()
    config = copy.deepcopy(model.generation_config)
    eos = config.eos_token_id
    pad = next((t for t in (config.pad_token_id, eos if isinstance(eos, int) else None, 0) if isinstance(t, int)), 0)
    config.update(
        do_sample=False, num_beams=1, max_new_tokens=_NEW_TOKENS, min_new_tokens=_NEW_TOKENS, max_length=None,
        pad_token_id=pad, use_cache=True,
    )  # fmt: skip
    inputs = cast_floating(inputs, torch.float32)
    with full_fp32(seed), torch.no_grad():
        return GenerationMixin.generate(model, **inputs, generation_config=config)


def _positions(model: nn.Module) -> int | None:
    """How many positions the model can embed (learned position tables end there), if it says."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return next((n for n in (getattr(config, k, None) for k in ("max_position_embeddings", "n_positions")) if isinstance(n, int)), None)


def _fit_prompt(model: nn.Module, inputs: dict, notes: list[str]) -> dict | None:
    """The prompt cut so that it and the new tokens fit the model's positions (past them GPT-2's
    position lookup reads out of bounds: an error on CPU, a device-side assert that ends the
    process on CUDA); None when not even one prompt token fits."""
    ids, limit = inputs.get("input_ids"), _positions(model)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or limit is None or ids.shape[1] + _NEW_TOKENS <= limit:
        return inputs
    keep = limit - _NEW_TOKENS
    if keep < 1:
        notes.append(f"generate() not checked: the model has {limit} positions, fewer than {_NEW_TOKENS} new tokens need")
        return None
    notes.append(f"generate() checked on the first {keep} prompt tokens: the model has {limit} positions")
    return {k: v[:, :keep] if isinstance(v, torch.Tensor) and v.shape[:2] == ids.shape else v for k, v in inputs.items()}


def _generate_check(original: nn.Module, optimized: nn.Module, named: dict, seed: int, notes: list[str]) -> list[Check]:
    inputs = {k: v for k, v in named.items() if k not in _NOT_FOR_GENERATE and not k.startswith("output_")}
    inputs = _fit_prompt(original, inputs, notes)
    if inputs is None:
        return []
    mode = f"generate {_NEW_TOKENS} greedy"
    rule = "token ids identical"
    try:
        expected = _generate(original, inputs, seed)
    except Exception as error:  # noqa: BLE001
        notes.append(f"generate() not checked: the original raised {type(error).__name__}: {error}")
        return []
    try:
        got = _generate(optimized, inputs, seed)
    except Exception as error:  # noqa: BLE001
        return [Check("tokens", mode, "float32", float("inf"), 1.0, 0.0, f"{rule}; raised {type(error).__name__}: {error}", False, ratio=float("inf"))]
    if got.shape != expected.shape:
        return [Check("tokens", mode, "float32", float("inf"), 1.0, 0.0, f"{rule}; shapes {tuple(got.shape)} vs {tuple(expected.shape)}", False, ratio=float("inf"))]
    wrong = int((got != expected).sum())
    return [Check("tokens", mode, "float32", float(wrong), wrong / got.numel(), 0.0, rule, wrong == 0, ratio=float(wrong), tensors=1)]
