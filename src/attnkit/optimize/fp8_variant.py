"""The FP8 inference variant of ``optimize`` (``OptimizeConfig.fp8``): approximate, on request, never the returned model.

The exact optimized model is deep-copied and its GEMM layers (``nn.Linear`` and fused projection groups)
converted by :func:`attnkit.fp8.convert_to_float8_training` with the automatic filter: a layer becomes
FP8 only where the measured speed table says FP8 is faster at its GEMM shape, with ``M`` the tokens that
layer saw on the example inputs (a layer whose ``M`` is not a multiple of the recipe's block would run
high precision anyway, so it is left alone and reported). Its accuracy is measured, not assumed: its
outputs on the example inputs against the original model in float64 (:func:`fp8_accuracy`).
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn

from attnkit.fp8 import Float8TrainingConfig, conversion_plan, convert_to_float8_training, fp8_unavailable
from attnkit.optimize.compare import float_tensors, full_fp32, tensor_errors
from attnkit.optimize.config import OptimizeConfig
from attnkit.optimize.fuse import FusedProjection
from attnkit.optimize.report import Float8Accuracy, Float8Variant
from attnkit.utils.modules import model_device
from attnkit.utils.trees import cast_floating

__all__ = ["build_fp8_variant", "fp8_accuracy"]

def _layer_tokens(model: nn.Module, gemm_layers: set[str], args: tuple, kwargs: dict) -> dict[str, int]:
    """GEMM layer fqn -> the largest M (input rows) it saw in one eval forward of ``model``. A fused group's
    GEMM is reached through its members (:class:`FusedProjection`), which is where it is observed."""
    seen: dict[str, int] = {}
    groups = {id(module): fqn for fqn, module in model.named_modules() if fqn in gemm_layers}

    def record(fqn: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            seen[fqn] = max(seen.get(fqn, 0), inputs[0].shape[:-1].numel())
        return hook

    hooks = []
    for fqn, module in model.named_modules():
        if isinstance(module, FusedProjection) and id(module._group) in groups:
            hooks.append(module.register_forward_pre_hook(record(groups[id(module._group)])))
        elif fqn in gemm_layers and not hasattr(module, "member_output"):
            hooks.append(module.register_forward_pre_hook(record(fqn)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return seen


def build_fp8_variant(original: nn.Module, exact: nn.Module, args: tuple, kwargs: dict, config: OptimizeConfig) -> Float8Variant:
    """The FP8 variant of ``exact`` (eager, in its dtype) with its plan and accuracy, untimed; ``built=False`` and
    the reason when FP8 cannot run here. ``args``/``kwargs`` are the example inputs (any dtype)."""
    recipe, emulate = config.fp8, config.fp8_emulate
    reason = None if emulate else fp8_unavailable(model_device(exact), recipe)
    if reason is not None:
        return Float8Variant(recipe, built=False, reason=reason)
    dtype = next((p.dtype for p in exact.parameters() if p.is_floating_point()), torch.float32)
    a, k = cast_floating(args, dtype), cast_floating(kwargs, dtype)
    model = copy.deepcopy(exact).eval()
    layers = set(conversion_plan(model))
    tokens = _layer_tokens(model, layers, a, k)
    # The speed filter describes real FP8 GEMMs only (the config refuses it with emulate=True).
    fp8_config = Float8TrainingConfig.from_recipe_name(recipe, emulate=emulate, auto_filter=not emulate,
                                                       auto_filter_tokens=max(16, max(tokens.values(), default=16)))
    block = fp8_config.block_size
    aligned = lambda module, fqn: tokens.get(fqn, 0) % block == 0 and fqn in tokens  # noqa: E731
    plan = conversion_plan(model, config=fp8_config, module_filter_fn=aligned)
    for fqn, why in plan.items():
        if why == "excluded by module_filter_fn":
            plan[fqn] = (f"{tokens[fqn]} tokens per call, not a multiple of {block} (runs high precision)" if fqn in tokens
                         else "not called on the example inputs")
    convert_to_float8_training(model, config=fp8_config, module_filter_fn=aligned)
    kept = dict(Counter(why for why in plan.values() if why is not None))
    converted = len(plan) - sum(kept.values())
    if not converted:  # the variant would be the exact model: say why instead of timing a copy
        why = "; ".join(f"{reason} (x{count})" for reason, count in kept.items()) or "the model has no nn.Linear"
        return Float8Variant(recipe, built=False, reason=f"no GEMM layer would run in FP8: {why}", emulated=emulate,
                             layers=len(plan), kept=kept)  # fmt: skip
    accuracy = fp8_accuracy(original, exact, model, args, kwargs)
    return Float8Variant(recipe, built=True, emulated=emulate, converted=converted, layers=len(plan), kept=kept,
                         accuracy=accuracy, model=model)  # fmt: skip


def _rel_errors(got: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[float, float]:
    """(worst ``max|got - ref| / max|ref|`` as the equivalence proof measures it, worst ``||got - ref|| / ||ref||``)."""
    max_rel = max((error / scale if scale else 0.0 for error, scale in tensor_errors(got, ref)), default=0.0)
    rel_rms = max((((g.double() - r).norm() / r.norm().clamp_min(1e-300)).item() for g, r in zip(got, ref, strict=True)), default=0.0)
    return max_rel, rel_rms


def _logits(output) -> torch.Tensor | None:
    """The ``logits`` of a transformers output (a ``dict`` subclass) or a dict, else None."""
    logits = output.get("logits") if isinstance(output, dict) else None
    return logits if isinstance(logits, torch.Tensor) and logits.is_floating_point() else None


def fp8_accuracy(original: nn.Module, exact: nn.Module, fp8: nn.Module, args: tuple, kwargs: dict) -> Float8Accuracy:
    """Outputs of ``fp8`` and ``exact`` (each in its own dtype) against ``original`` in float64 on the example
    inputs, eval mode, full fp32 matmuls (no TF32). None of the models is changed."""
    dtype = next((p.dtype for p in fp8.parameters() if p.is_floating_point()), torch.float32)

    def run(model: nn.Module, run_dtype: torch.dtype):
        was_training = model.training
        model.eval()
        try:
            with full_fp32(), torch.no_grad():
                return model(*cast_floating(args, run_dtype), **cast_floating(kwargs, run_dtype))
        finally:
            model.train(was_training)

    reference = run(copy.deepcopy(original).double(), torch.float64)
    got, exact_out = run(fp8, dtype), run(exact, dtype)
    ref_tensors = float_tensors(reference)
    max_rel, rel_rms = _rel_errors(float_tensors(got), ref_tensors)
    _, exact_rms = _rel_errors(float_tensors(exact_out), ref_tensors)
    logits, ref_logits = _logits(got), _logits(reference)
    top1 = None
    if logits is not None and ref_logits is not None:
        top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).double().mean().item()
    return Float8Accuracy(max_rel, rel_rms, exact_rms, top1, str(dtype).removeprefix("torch."))
