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

Train-mode checks run in training mode with every stochastic part off (dropout probabilities
and layer-drop rates set to 0, stochastic-depth modules in eval) and the random stream seeded
identically for both models; the gradient is that of ``sum(out_i * w_i)`` with fixed random
``w_i`` and is compared per parameter under the original's state-dict names (fused parameters are
split back by their state-dict hooks). A separate ``dropout`` check then runs both models in
training mode with the ``nn.Dropout`` modules both call turned off (hidden-state dropout) and the rest
left on (attention dropout, which transformers passes to the attention function, or which the
original applies with a module the rewrite no longer calls): the rewrite must be random exactly when
the original is.

Token inputs without an ``attention_mask`` get a second eval check with right padding, and
decoders get the cached-decoding and ``generate()`` checks of :mod:`attnkit.optimize.decoding`.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect

import torch
from torch import nn

from attnkit.nn import MultiHeadAttention
from attnkit.optimize.compare import float_tensors, fp32_check, full_fp32, named_inputs, tensor_errors
from attnkit.optimize.config import OptimizeConfig
from attnkit.optimize.decoding import decoding_checks
from attnkit.optimize.report import Check
from attnkit.utils.trees import cast_floating

__all__ = ["check_equivalence"]

# Float attributes that attention and layer code read as a probability of dropping something.
_DROPOUT_FLOATS = ("dropout", "attention_dropout", "attn_dropout", "dropout_p", "attn_pdrop", "dropout_prob", "layerdrop", "drop_prob")
# Stochastic-depth modules (timm/transformers DropPath, torchvision StochasticDepth): identity in eval.
_STOCHASTIC_DEPTH = ("DropPath", "StochasticDepth")



def _is_stochastic_depth(module: nn.Module) -> bool:
    return any(name in type(module).__name__ for name in _STOCHASTIC_DEPTH)


def _disable_dropout(model: nn.Module, *, only: set[int] | None = None) -> None:
    """Turn off every stochastic part of ``model`` (train mode stays on elsewhere).

    Dropout modules and the float probabilities attention code reads are set to 0, layer-drop
    rates too, stochastic-depth modules are put in eval. With ``only``, just the ``nn.Dropout``
    modules whose ids are in it (and stochastic depth, layer drop) are turned off.
    """
    for module in model.modules():
        if _is_stochastic_depth(module):
            module.eval()
        if isinstance(module, nn.modules.dropout._DropoutNd):
            if only is None or id(module) in only:
                module.p = 0.0
            continue
        for name in _DROPOUT_FLOATS:
            value = module.__dict__.get(name)
            if isinstance(value, float) and (only is None or name in ("layerdrop", "drop_prob")):
                setattr(module, name, 0.0)
        if only is None and isinstance(module, MultiHeadAttention):
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


def _run(model: nn.Module, args: tuple, kwargs: dict, *, dtype: torch.dtype, train: bool, seed: int, keys: set[str]):
    """(outputs, gradients or None) of a copy of ``model`` in ``dtype`` (fp32 without TF32, seeded)."""
    with full_fp32(seed):
        return _run_copy(model, args, kwargs, dtype=dtype, train=train, seed=seed, keys=keys)


def _run_copy(model: nn.Module, args: tuple, kwargs: dict, *, dtype: torch.dtype, train: bool, seed: int, keys: set[str]):
    model = copy.deepcopy(model).to(dtype)
    args, kwargs = cast_floating(args, dtype), cast_floating(kwargs, dtype)
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


def _dtype_check(what: str, mode: str, dtype: torch.dtype, got, base, ref, factor: float) -> Check:
    """``got`` and ``base`` (the original) in ``dtype``, ``ref`` the original in float64."""
    opt_errors, base_errors = tensor_errors(got, ref), tensor_errors(base, ref)
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
    original: nn.Module, optimized: nn.Module, args: tuple, kwargs: dict, *, config: OptimizeConfig, notes: list[str] | None = None
) -> list[Check]:
    """Compare ``optimized`` with ``original`` on every path the model is used in.

    Both models are copied for each run, so neither is changed. Returns one :class:`Check` per
    (outputs | gradients) x (eval | train) x (fp32 | target dtype), plus: eval outputs with right
    padding (token inputs given without a mask), ``dropout`` in train mode, and for decoders the
    cached-decoding and ``generate()`` checks (fp32). What could not be checked is appended to ``notes``.
    """
    keys = {name for name, _ in original.named_parameters()}
    trainable = config.check_training and any(p.requires_grad for p in original.parameters())
    modes = ("eval", "train") if trainable else ("eval",)
    checks: list[Check] = []
    for mode in modes:
        checks += _mode_checks(original, optimized, args, kwargs, mode, config, keys)
    padded = _padded(original, args, kwargs)
    if padded is not None:
        checks += _mode_checks(original, optimized, *padded, "eval+padding", config, keys)
    notes = notes if notes is not None else []
    if trainable:
        checks += _guarded("dropout", "train", lambda a, b: _dropout_checks(a, b, args, kwargs, config.seed), original, optimized, notes)

    def decoding(a: nn.Module, b: nn.Module) -> list[Check]:
        found, not_run = decoding_checks(a, b, args, kwargs, rtol=config.fp32_rtol, seed=config.seed)
        if b is optimized:  # not the original-against-itself probe of a check that raised
            notes.extend(not_run)
        return found

    return checks + _guarded("cached decoding", "eval", decoding, original, optimized, notes)


def _guarded(what: str, mode: str, check, original: nn.Module, optimized: nn.Module, notes: list[str]) -> list[Check]:
    """``check(original, optimized)``; if it raises, a failed check with the error, unless the original
    raises there against itself too (then a note: the check cannot run on this model)."""
    try:
        return check(original, optimized)
    except Exception as error:  # noqa: BLE001 - a check that raises never crashes optimize
        try:
            check(original, original)
        except Exception as own:  # noqa: BLE001 - the original cannot run this check: nothing to compare
            notes.append(f"{what} not checked: the original raised {type(own).__name__}: {' '.join(str(own).split())[:200]}")
            return []
        return [_raised(what, mode, "float32", error)]


def _raised(what: str, mode: str, dtype: str, error: Exception) -> Check:
    """A failed check for a run that raised (the optimized model, or a check that runs both models)."""
    message = " ".join(str(error).split())[:240]
    return Check(what, mode, dtype, float("inf"), float("inf"), 0.0, f"raised {type(error).__name__}: {message}", False, ratio=float("inf"))


def _mode_checks(original, optimized, args, kwargs, mode: str, config: OptimizeConfig, keys: set[str]) -> list[Check]:
    train = mode == "train"
    options = dict(train=train, seed=config.seed, keys=keys)
    orig_out, orig_grad = _run(original, args, kwargs, dtype=torch.float32, **options)
    try:
        opt_out, opt_grad = _run(optimized, args, kwargs, dtype=torch.float32, **options)
    except Exception as error:  # noqa: BLE001 - a rewrite that cannot run has failed its check; it is never kept
        return [_raised("outputs", mode, "float32", error)]
    checks = [fp32_check("outputs", mode, opt_out, orig_out, config.fp32_rtol)]
    if train:
        names = sorted(orig_grad)
        checks.append(fp32_check("gradients", mode, [opt_grad[n] for n in names], [orig_grad[n] for n in names], 10 * config.fp32_rtol))
    dtype = config.dtype
    if dtype is None or dtype in (torch.float32, torch.float64):
        return checks
    ref_out, ref_grad = _run(original, args, kwargs, dtype=torch.float64, **options)
    base_out, base_grad = _run(original, args, kwargs, dtype=dtype, **options)
    try:
        low_out, low_grad = _run(optimized, args, kwargs, dtype=dtype, **options)
    except Exception as error:  # noqa: BLE001 - as above
        return checks + [_raised("outputs", mode, str(dtype).removeprefix("torch."), error)]
    checks.append(_dtype_check("outputs", mode, dtype, low_out, base_out, ref_out, config.dtype_factor))
    if train:
        names = sorted(ref_grad)
        pick = lambda grads: [grads[n] for n in names]  # noqa: E731
        checks.append(_dtype_check("gradients", mode, dtype, pick(low_grad), pick(base_grad), pick(ref_grad), 1.5 * config.dtype_factor))
    return checks


def _padded(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The inputs with a right-padding ``attention_mask`` (sequence b loses its last b+1 tokens,
    at least one kept), when the model takes token ids and a mask and none was given."""
    named = named_inputs(model, args, kwargs)
    if named is None or "attention_mask" not in inspect.signature(model.forward).parameters or named.get("attention_mask") is not None:
        return None
    ids = named.get("input_ids")
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point() and ids.shape[1] > 1):
        return None
    mask = torch.ones_like(ids)
    for b in range(ids.shape[0]):
        mask[b, max(1, ids.shape[1] - b - 1) :] = 0
    return (), {**named, "attention_mask": mask}


def _called_dropouts(model: nn.Module, args: tuple, kwargs: dict, seed: int) -> set[str]:
    """Paths of the ``nn.Dropout`` modules a train-mode forward of ``model`` calls."""
    called: set[str] = set()
    hooks = [
        m.register_forward_hook(lambda module, *_, path=path: called.add(path))
        for path, m in model.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd)
    ]
    try:
        with full_fp32(seed), torch.no_grad():
            model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return called


def _stochastic(model: nn.Module, args: tuple, kwargs: dict, seed: int, hidden: set[str]) -> tuple[bool, float]:
    """Whether two train-mode forwards of ``model`` (a copy in train mode) differ with the ``nn.Dropout``
    modules at the paths ``hidden``, layer drop and stochastic depth off; and ``max|run1 - run2| / max|run1|``."""
    _disable_dropout(model, only={id(m) for path, m in model.named_modules() if path in hidden})
    runs = []
    for offset in (0, 1):
        with full_fp32(seed + offset), torch.no_grad():
            runs.append(float_tensors(model(*args, **kwargs)))
    diff = max(((a - b).abs().max().item() for a, b in zip(*runs) if a.numel()), default=0.0)
    scale = max((a.abs().max().item() for a in runs[0] if a.numel()), default=0.0)
    return diff > 0, diff / max(scale, 1e-30)


def _dropout_checks(original: nn.Module, optimized: nn.Module, args: tuple, kwargs: dict, seed: int) -> list[Check]:
    """Attention dropout survives the rewrite: random in train mode exactly when the original is
    (no check when neither is).

    Hidden-state dropout is turned off first: the ``nn.Dropout`` modules that both models call. A module
    only the original calls is its attention dropout applied by hand (GPT-2's eager
    ``reorder_and_upcast_attn`` path), which the rewrite applies inside the attention call instead; it stays on.
    """
    original, optimized = copy.deepcopy(original).train(), copy.deepcopy(optimized).train()
    hidden = _called_dropouts(original, args, kwargs, seed) & _called_dropouts(optimized, args, kwargs, seed)
    orig_random, _ = _stochastic(original, args, kwargs, seed, hidden)
    opt_random, change = _stochastic(optimized, args, kwargs, seed, hidden)
    if not (orig_random or opt_random):
        return []
    rule = "train mode random iff the original is (attention dropout kept)"
    passed = orig_random == opt_random
    return [Check("dropout", "train", "float32", change, change, 0.0, rule, passed, ratio=0.0 if passed else float("inf"))]
