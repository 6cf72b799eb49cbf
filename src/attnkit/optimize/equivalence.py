"""Prove a rewrite: compare the optimized model with the original on the same random inputs.

Two rules, both stated in every :class:`~attnkit.optimize.report.Check`:

- **fp32**: the original in fp32 is the reference; outputs pass if, for every output tensor,
  ``max|opt - orig| <= fp32_rtol * max|orig|`` (default ``1e-5``); gradients get ``10 * fp32_rtol``
  (a backward pass sums over the batch and sequence and reorders more). ``max|orig|`` is floored
  at 1e-3 of the largest tensor's, since some gradients are zero in exact arithmetic (a key
  bias: softmax ignores a constant shift) and are pure rounding noise.
- **target dtype** (bf16/fp16): the original in float64 is the reference. The original run in
  the target dtype drifts from it by ``baseline``; the optimized model in that dtype must stay
  within ``dtype_factor * baseline`` (default 2x for outputs, 1.5 * 2 = 3x for gradients) plus a
  floor of ``eps(dtype) * 1e-3 * max|ref|`` for tensors the original reproduces exactly. This is
  the FlashAttention rule: a faster kernel may not add more than ordinary rounding does.

Train-mode checks run in training mode with every dropout probability set to 0 (dropout is
random, so two implementations can only agree with it off); the gradient is that of
``sum(out_i * w_i)`` with fixed random ``w_i`` and is compared per parameter under the
original's state-dict names (fused ``qkv`` gradients are split back).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from attnkit.nn import MultiHeadAttention
from attnkit.optimize.config import OptimizeConfig
from attnkit.optimize.core import AttentionCore
from attnkit.optimize.report import Check

__all__ = ["check_equivalence", "float_tensors"]

_FLOOR = 1e-3
_DROPOUT_FLOATS = ("dropout", "attention_dropout", "dropout_p", "attn_pdrop")


def float_tensors(value: Any) -> list[torch.Tensor]:
    """Every floating tensor inside a model output (tensors, tuples, lists, dicts, ModelOutputs), in order."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in float_tensors(item)]
    return []


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (modules and the float attributes attention code reads)."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name in _DROPOUT_FLOATS:
            value = module.__dict__.get(name)
            if isinstance(value, float):
                setattr(module, name, 0.0)
        if isinstance(module, AttentionCore):
            module.dropout_p = 0.0
        if isinstance(module, MultiHeadAttention):
            module.config = dataclasses.replace(module.config, dropout=0.0)


def _gradients_by_state_key(model: nn.Module, keys: set[str]) -> dict[str, torch.Tensor]:
    """Parameter gradients under ``model.state_dict()`` names (state-dict hooks split fused parameters)."""
    params = dict(model.named_parameters())
    saved = {name: p.data for name, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.data = p.grad if p.grad is not None else torch.zeros_like(p)
        state = model.state_dict()
        for name, p in params.items():
            p.data = saved[name]
    return {key: value for key, value in state.items() if key in keys}


@contextlib.contextmanager
def _full_fp32():
    """fp32 matmuls and convolutions in full fp32 (no TF32), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def _run(model: nn.Module, args: tuple, kwargs: dict, *, dtype: torch.dtype, train: bool, seed: int, keys: set[str]):
    """(outputs, gradients or None) of a copy of ``model`` in ``dtype`` (fp32 without TF32)."""
    with _full_fp32():
        return _run_copy(model, args, kwargs, dtype=dtype, train=train, seed=seed, keys=keys)


def _run_copy(model: nn.Module, args: tuple, kwargs: dict, *, dtype: torch.dtype, train: bool, seed: int, keys: set[str]):
    model = copy.deepcopy(model).to(dtype)
    args, kwargs = _cast(args, dtype), _cast(kwargs, dtype)
    if not train:
        model.eval()
        with torch.no_grad():
            return [t.detach() for t in float_tensors(model(*args, **kwargs))], None
    model.train()
    _disable_dropout(model)
    outputs = float_tensors(model(*args, **kwargs))
    generator = torch.Generator().manual_seed(seed)
    loss = sum((out.double() * torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device)).sum() for out in outputs)
    loss.backward()
    return [t.detach() for t in outputs], _gradients_by_state_key(model, keys)


def _errors(got: list[torch.Tensor], ref: list[torch.Tensor]) -> list[tuple[float, float]]:
    """Per tensor: (max abs error, scale), scale = ``max|ref|`` floored at ``_FLOOR`` x the largest
    ``max|ref|`` of the set (some gradients are zero in exact arithmetic, e.g. of a key bias)."""
    assert len(got) == len(ref), (len(got), len(ref))
    result = []
    for a, b in zip(got, ref):
        assert a.shape == b.shape, (a.shape, b.shape)
        a, b = a.double(), b.double()
        result.append(((a - b).abs().max().item() if a.numel() else 0.0, b.abs().max().item() if b.numel() else 0.0))
    largest = max((scale for _, scale in result), default=0.0)
    return [(err, max(scale, _FLOOR * largest)) for err, scale in result]


def _fp32_check(what: str, mode: str, got, ref, rtol: float) -> Check:
    errors = _errors(got, ref)
    max_rel = max((err / max(scale, 1e-30) for err, scale in errors), default=0.0)
    max_abs = max((e for e, _ in errors), default=0.0)
    rule = f"|opt-orig| <= {rtol:g} max|orig|"
    return Check(what, mode, "float32", max_abs, max_rel, rtol, rule, max_rel <= rtol, ratio=max_rel / rtol, tensors=len(errors))


def _dtype_check(what: str, mode: str, dtype: torch.dtype, got, base, ref, factor: float) -> Check:
    """``got`` and ``base`` (the original) in ``dtype``, ``ref`` the original in float64."""
    opt_errors, base_errors = _errors(got, ref), _errors(base, ref)
    eps = torch.finfo(dtype).eps
    ratios, bounds = [], []
    for (err, scale), (base_err, _) in zip(opt_errors, base_errors):
        bound = factor * base_err + eps * 1e-3 * scale
        bounds.append(bound)
        ratios.append(err / max(bound, 1e-30))
    worst = max(range(len(ratios)), key=ratios.__getitem__) if ratios else 0
    name = str(dtype).removeprefix("torch.")
    return Check(
        what, mode, name,
        max_abs=max((e for e, _ in opt_errors), default=0.0),
        max_rel=max((e / max(s, 1e-30) for e, s in opt_errors), default=0.0),
        tolerance=bounds[worst] if bounds else 0.0,
        rule=f"|opt-fp64| <= {factor:g} |orig {name}-fp64|",
        passed=all(r <= 1.0 for r in ratios),
        ratio=ratios[worst] if ratios else 0.0,
        baseline=base_errors[worst][0] if base_errors else None,
        tensors=len(opt_errors),
    )  # fmt: skip


def check_equivalence(
    original: nn.Module, optimized: nn.Module, args: tuple, kwargs: dict, *, config: OptimizeConfig
) -> list[Check]:
    """Compare ``optimized`` with ``original`` in eval (and train) mode, fp32 and ``config.dtype``.

    Both models are copied for each run, so neither is changed. Returns one :class:`Check` per
    (outputs | gradients) x (eval | train) x (fp32 | target dtype).
    """
    keys = {name for name, _ in original.named_parameters()}
    trainable = config.check_training and any(p.requires_grad for p in original.parameters())
    modes = ("eval", "train") if trainable else ("eval",)
    checks: list[Check] = []
    for mode in modes:
        train = mode == "train"
        options = dict(train=train, seed=config.seed, keys=keys)
        orig_out, orig_grad = _run(original, args, kwargs, dtype=torch.float32, **options)
        opt_out, opt_grad = _run(optimized, args, kwargs, dtype=torch.float32, **options)
        checks.append(_fp32_check("outputs", mode, opt_out, orig_out, config.fp32_rtol))
        if train:
            names = sorted(orig_grad)
            checks.append(_fp32_check("gradients", mode, [opt_grad[n] for n in names], [orig_grad[n] for n in names], 10 * config.fp32_rtol))
        dtype = config.dtype
        if dtype is None or dtype in (torch.float32, torch.float64):
            continue
        ref_out, ref_grad = _run(original, args, kwargs, dtype=torch.float64, **options)
        base_out, base_grad = _run(original, args, kwargs, dtype=dtype, **options)
        low_out, low_grad = _run(optimized, args, kwargs, dtype=dtype, **options)
        checks.append(_dtype_check("outputs", mode, dtype, low_out, base_out, ref_out, config.dtype_factor))
        if train:
            names = sorted(ref_grad)
            pick = lambda grads: [grads[n] for n in names]  # noqa: E731
            checks.append(_dtype_check("gradients", mode, dtype, pick(low_grad), pick(base_grad), pick(ref_grad), 1.5 * config.dtype_factor))
    return checks
