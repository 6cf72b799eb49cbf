"""`optimize()`: rewrite a model's attention for speed, prove it still computes the same, measure it."""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any

import torch
from torch import nn

from attnkit.discover import SiteRecord
from attnkit.errors import check_arg, check_type
from attnkit.nn import MultiHeadAttention, why_not_fast_path
from attnkit.ops import BACKENDS, select_backend
from attnkit.optimize.config import OptimizeConfig
from attnkit.optimize.equivalence import check_equivalence
from attnkit.optimize.fuse import apply_fusion, plan_fusion
from attnkit.optimize.hf_interface import record_calls
from attnkit.optimize.hf_models import Switch, backend_uses, describe_calls, revert, switch_to_attnkit
from attnkit.optimize.report import BackendUse, Float8Variant, Latency, OptimizationReport
from attnkit.optimize.rewrite import ModuleFilterFn, Skip, nested_tensor_twin, rewrite_modules
from attnkit.optimize.select import approximate_variants, compile_mode_of, compiled, select_variant
from attnkit.utils.dtypes import dtype_name, parse_dtype
from attnkit.utils.modules import model_device, model_dtype
from attnkit.utils.trees import cast_floating, outside_inference

__all__ = ["optimize", "measure_latency"]


# Whatever mode the caller is in (inference_mode, no_grad), the rewrite builds normal parameters (an
# inference-mode copy could never be trained) and its proof runs gradients.
@torch.enable_grad()
@torch.inference_mode(False)
def optimize(
    model: nn.Module,
    example_inputs: tuple | torch.Tensor | None = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    backend: str | None = None,
    fuse_qkv: bool | None = None,
    config: OptimizeConfig | None = None,
    module_filter_fn: ModuleFilterFn | None = None,
) -> tuple[nn.Module, OptimizationReport]:
    """Rewrite every recognised attention in ``model`` and prove the result equivalent.

    Rewrites (each keeps an ordinary, trainable, ``torch.compile``-able ``nn.Module`` whose
    ``state_dict`` has the original's keys):

    - ``nn.MultiheadAttention`` -> ``attnkit.nn.MultiHeadAttention`` (packed in-projection,
      the ``attnkit.ops`` backend, weights computed only when ``need_weights=True``);
    - every transformers model whose attention goes through transformers' ``AttentionInterface``
      -> ``attn_implementation="attnkit"`` (its own projections, masks, caches and dropout; the
      attention core on ``attnkit.ops``; see :mod:`attnkit.optimize.hf_interface`); a model or
      module that cannot switch, or whose every call falls back, is listed in ``report.skipped``;
    - patchify convolutions (``nn.Conv2d`` with stride == kernel size: ViT's patch embedding) ->
      :class:`PatchifyGEMM` (the image reshaped into patches and one GEMM);
    - anything else is left alone and listed in ``report.skipped``.

    Args:
        model: any ``nn.Module``. Not modified unless ``config.inplace``.
        example_inputs: positional inputs (a tensor or a tuple) for the equivalence check and timing.
        example_kwargs: keyword inputs (e.g. ``attention_mask``) for the same.
        dtype: cast the optimized model to this dtype (``torch.bfloat16`` or ``"bf16"``...).
        backend: ``"auto"`` or an ``attnkit.ops`` backend name for every rewritten attention.
        fuse_qkv: fuse separate Q/K/V projections (default True).
        config: all options (:class:`OptimizeConfig`); ``dtype``/``backend``/``fuse_qkv`` override it.
        module_filter_fn: ``(module, fqn) -> bool``; only attention modules it accepts are rewritten.

    Returns:
        ``(optimized_model, report)``. If an equivalence check failed, ``report.passed`` and
        ``report.kept`` are False and the model returned is the original (a copy of it as it was
        when ``config.inplace``): a rewrite that fails its proof is not kept.
        With ``config.select`` the model is the fastest proven variant (possibly the original,
        unchanged but for ``dtype``), and ``report.selection`` lists every candidate's latency.
        With ``config.fp8`` (a recipe name), ``report.fp8`` holds the approximate FP8 variant: its
        accuracy against the original in float64, its speed next to the exact pick's (raced with the
        others under ``select``, never picked) and the model itself (``report.fp8.model``), or why it
        was not built. The returned model is the exact one either way.

    Example::

        fast, report = optimize(model, (pixels,), dtype="bf16")
        print(report.dumps())
    """
    check_type(model, nn.Module, "model")
    check_type(config, (OptimizeConfig, type(None)), "config", "Build one with OptimizeConfig(...) or OptimizeConfig.from_preset(name).")
    config = config or OptimizeConfig()
    overrides = {"dtype": parse_dtype(dtype)} if dtype is not None else {}
    if backend is not None:
        overrides["backend"] = backend
    if fuse_qkv is not None:
        overrides["fuse_qkv"] = fuse_qkv
    config = dataclasses.replace(config, **overrides)
    _check_backend(config.backend)
    args = outside_inference(_as_args(example_inputs))
    check_type(example_kwargs, (dict, type(None)), "example_kwargs", "Pass keyword inputs as a dict.")
    kwargs = outside_inference(dict(example_kwargs or {}))
    check_arg(module_filter_fn is None or callable(module_filter_fn), "module_filter_fn", "a callable (module, fqn) -> bool or None", module_filter_fn)

    original = model
    working = model if config.inplace else copy.deepcopy(model)
    # The original as it was, for the checks and the "before" timing (a copy when rewriting in place).
    reference = copy.deepcopy(model) if (config.inplace and (config.check or config.measure) and args is not None) else original
    optimized, rewrites, skips = rewrite_modules(working, config, module_filter_fn)
    report = OptimizationReport(model=type(model).__name__, config=config.describe(), rewrites=rewrites, skipped=skips)
    if config.rewrite_hf:
        _use_attention_interface(optimized, args, kwargs, config, module_filter_fn, report)
    if config.fuse_qkv and args is not None:  # sibling Linears that read the same input -> one GEMM
        report.fusion = plan_fusion(optimized, args, kwargs, module_filter_fn=module_filter_fn)
        apply_fusion(optimized, report.fusion)
    elif config.fuse_qkv:
        report.notes.append("no example inputs: projections not fused (fusion traces which projections read the same input)")
    if not report.rewrites and not (report.fusion is not None and report.fusion.groups):
        report.notes.append("nothing was rewritten or fused: the returned model computes what the original does, and its checks compare it with itself")
    if args is None:
        report.notes.append("no example inputs: equivalence not checked, latency not measured")
    elif config.check:  # before the cast: the fp32 check needs the fp32 weights
        check_config = config if config.dtype is not None else dataclasses.replace(config, dtype=model_dtype(model))
        checked, note = nested_tensor_twin(reference, optimized)
        report.notes += [note] if note else []
        report.checks = check_equivalence(checked, optimized, args, kwargs, config=check_config, notes=report.notes)
        if not report.passed:
            failed = ", ".join(f"{c.what} {c.mode} {c.dtype}" for c in report.checks if not c.passed)
            if report.rewrites and report.fusion is not None and report.fusion.groups and not config.inplace:
                # The fused projections may be what failed, in a way plan_fusion's trace could not foresee (it
                # already leaves out in-place writes and views a fused slice cannot give): prove the rest without them.
                without, retry = optimize(model, args, example_kwargs=kwargs, config=dataclasses.replace(config, fuse_qkv=False),
                                          module_filter_fn=module_filter_fn)  # fmt: skip
                if retry.kept and retry.rewrites:
                    retry.notes.insert(0, f"with its projections fused the rewrite failed the proof ({failed}): kept without the fusion")
                    return without, retry
            report.kept = False
            report.notes.append(f"equivalence failed ({failed}): the rewrite is not kept, the original model is returned")
            if config.fp8 is not None:
                report.fp8 = Float8Variant(config.fp8, built=False, reason="the exact rewrite failed its equivalence check")
            return _in_dtype(reference, config.dtype), report
    if config.dtype is not None:
        optimized = optimized.to(config.dtype)
    if args is not None:
        _record_backends(optimized, args, kwargs, config, report)
    if config.fp8 is not None:
        report.fp8 = _fp8_variant(reference, optimized, args, kwargs, config)
    if config.select and args is not None:
        return _select(reference, optimized, args, kwargs, config, report), report
    if config.select:
        report.notes.append("select needs example inputs: returned the rewritten model untimed")
    if config.compile != "none":
        optimized = compiled(optimized, config.compile)
        report.compiled = config.compile
    if args is not None and config.measure and model_device(optimized).type == "cuda":
        report.latency = measure_latency(reference, optimized, args, kwargs, config=config)
    elif args is not None and config.measure:
        report.notes.append("latency measured only on CUDA; this model is on the CPU")
    if report.fp8 is not None and report.fp8.model is not None:
        report.fp8 = _time_fp8(reference, report.fp8, args, kwargs, config, report.latency)
    return optimized, report


def _fp8_variant(reference: nn.Module, exact: nn.Module, args, kwargs: dict, config: OptimizeConfig) -> Float8Variant:
    """The FP8 variant of the exact model (built, planned, accuracy measured; untimed), or why not."""
    if args is None:
        return Float8Variant(config.fp8, built=False, reason="no example inputs (the plan and the accuracy check run on them)")
    # Imported here: attnkit.fp8 imports attnkit.optimize.fuse, so a top-level import would be circular.
    from attnkit.optimize.fp8_variant import build_fp8_variant

    return build_fp8_variant(reference, exact, args, kwargs, config)


def _time_fp8(reference: nn.Module, variant: Float8Variant, args: tuple, kwargs: dict, config: OptimizeConfig, exact: Latency | None) -> Float8Variant:
    """Without ``select``: the FP8 variant (compiled like the exact model) timed as the exact model is (CUDA only)."""
    form, model = list(approximate_variants(variant.model, () if config.compile == "none" else (config.compile,)).items())[-1]
    if not (config.measure and model_device(variant.model).type == "cuda"):
        return dataclasses.replace(variant, model=model, form=form)
    latency = measure_latency(reference, model, args, kwargs, config=config)
    vs_exact = exact.after_ms / latency.after_ms if exact is not None else None
    return dataclasses.replace(variant, model=model, form=form, median_ms=latency.after_ms, speedup_vs_eager=latency.speedup, speedup_vs_exact=vs_exact)


def _as_args(example_inputs) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    check_type(example_inputs, (tuple, list), "example_inputs", "Pass a tensor or a tuple of positional inputs.")
    return tuple(example_inputs)


def _check_backend(backend: str) -> None:
    check_arg(backend == "auto" or backend in BACKENDS, "backend", f"'auto' or one of {sorted(BACKENDS)}", backend)


def _use_attention_interface(model: nn.Module, args, kwargs: dict, config: OptimizeConfig, module_filter_fn, report: OptimizationReport) -> None:
    """Switch every transformers model in ``model`` to attnkit's attention (in place) and list, from one
    eval forward on the example inputs, which attention modules attnkit serves and which it cannot."""
    switches, refused = switch_to_attnkit(model, backend=config.backend, masks=config.hf_masks, module_filter_fn=module_filter_fn)
    calls, failed = None, []
    if switches and args is not None:
        calls, failed = _probe(model, args, kwargs, switches)
        if calls is None:
            switches = []
    rewrites, skips = describe_calls(model, switches, calls)
    skips += failed
    handled = [entry.path for entry in (*rewrites, *skips, *refused)]
    # rewrite_modules lists attention-looking classes it does not swap; the interface decides for
    # those, and for their containers (BertAttention around BertSelfAttention).
    report.skipped = [s for s in report.skipped if not any(_nested(s.path, h) for h in handled)] + refused + skips
    report.rewrites += rewrites


def _nested(a: str, b: str) -> bool:
    """Whether module paths ``a`` and ``b`` are the same or one contains the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".") or "" in (a, b)


def _probe(model: nn.Module, args: tuple, kwargs: dict, switches: list[Switch]) -> tuple[list | None, list[Skip]]:
    """The attention calls of one eval forward; if it raised, None, the switches reverted and why."""
    was_training = model.training
    model.eval()
    try:
        with record_calls() as calls, torch.no_grad():
            model(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the switched model cannot run these inputs: keep transformers' own
        revert(switches)
        reason = f"the forward raised {type(error).__name__}: {error}"
        return None, [Skip(s.path, type(s.model).__name__, f"with attn_implementation={s.after!r} {reason}") for s in switches]
    finally:
        model.train(was_training)
    return calls, []


def _in_dtype(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """``model`` itself, or a copy cast to ``dtype`` when it has parameters or buffers of another float dtype."""
    tensors = (*model.parameters(), *model.buffers())
    if dtype is None or all(t.dtype == dtype for t in tensors if t.is_floating_point()):
        return model
    return copy.deepcopy(model).to(dtype)


def _select(reference: nn.Module, optimized: nn.Module, args: tuple, kwargs: dict, config: OptimizeConfig, report: OptimizationReport) -> nn.Module:
    """The fastest of the original and the rewritten model (eager, and compiled if allowed), timed; recorded in ``report``."""
    a, k = cast_floating(args, config.dtype), cast_floating(kwargs, config.dtype)
    modes = () if config.compile == "none" else config.compile if isinstance(config.compile, tuple) else (config.compile,)
    fp8 = report.fp8 if report.fp8 is not None and report.fp8.model is not None else None
    approximate = approximate_variants(fp8.model, modes) if fp8 is not None else {}
    chosen, selection = select_variant(
        _in_dtype(reference, config.dtype), optimized, lambda module: module(*a, **k), rewrite_passed=report.passed,
        compile_modes=modes, rounds=config.rounds, warmup=config.warmup, repeats=config.repeats, device=model_device(optimized),
        approximate=approximate,
    )  # fmt: skip
    report.selection = selection
    report.compiled = compile_mode_of(selection.picked)
    report.notes.append(selection.summary)
    timed = {c.name: c for c in selection.candidates}
    if timed["eager"].median_ms is not None and timed[selection.picked].median_ms is not None:
        dtype = dtype_name(config.dtype or model_dtype(optimized))
        report.latency = Latency(
            str(model_device(optimized)), dtype, timed["eager"].median_ms, timed[selection.picked].median_ms,
            report.compiled != "none", selection.clock,
        )  # fmt: skip
    if fp8 is not None:
        report.fp8 = _raced_fp8(fp8, approximate, timed, selection.picked)
    return chosen


def _raced_fp8(variant: Float8Variant, forms: dict[str, nn.Module], timed: dict, picked: str) -> Float8Variant:
    """The fastest raced form of the FP8 variant, with its paired ratio to eager and its ratio to the exact pick."""
    ran = [timed[name] for name in forms if timed[name].median_ms is not None]
    if not ran:
        notes = "; ".join(f"{name}: {timed[name].note}" for name in forms)
        return dataclasses.replace(variant, model=None, built=False, reason=f"no form of it ran ({notes})")
    best = min(ran, key=lambda c: c.median_ms)
    exact_ms = timed[picked].median_ms
    return dataclasses.replace(variant, model=forms[best.name], form=best.name, median_ms=best.median_ms, speedup_vs_eager=best.speedup,
                               speedup_vs_exact=None if exact_ms is None else exact_ms / best.median_ms)  # fmt: skip



def _record_backends(model: nn.Module, args: tuple, kwargs: dict, config: OptimizeConfig, report: OptimizationReport) -> None:
    """Run one eval forward so every rewritten attention decides its backend, then list the decisions."""
    mha_uses: list[BackendUse] = []
    hooks = [
        module.register_forward_pre_hook(_mha_probe(path, mha_uses), with_kwargs=True)
        for path, module in model.named_modules()
        if isinstance(module, MultiHeadAttention)
    ]
    try:
        with torch.no_grad(), record_calls() as calls:
            was_training = model.training
            model.eval()
            model(*cast_floating(args, config.dtype), **cast_floating(kwargs, config.dtype))
            model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    report.backends = backend_uses(model, calls) + mha_uses


def _mha_probe(path: str, uses: list[BackendUse]):
    """A pre-hook recording what ``attnkit.ops`` auto picks for an ``attnkit.nn.MultiHeadAttention`` call."""

    def hook(module: MultiHeadAttention, args: tuple, kwargs: dict) -> None:
        cfg = module.config
        query = args[0] if args else kwargs["query"]
        if query.dim() != 3:
            return
        site = SiteRecord.of_module_call(path, module, args, kwargs)  # the one description analyze and validate give too
        spec = site.spec(device=query.device.type, dtype=query.dtype)
        call = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        call.setdefault("key", query)
        call.setdefault("value", call["key"])
        options = {name: call[name] for name in ("key_padding_mask", "need_weights", "attn_mask", "is_causal", "kv_cache", "dropout_mask") if name in call}
        need_weights = call.get("need_weights", True)
        if why_not_fast_path(module, query, call["key"], call["value"], **options) is None:
            backend, why, rejected = "torch fused MHA", "eval, no grad: torch._native_multi_head_attention, as nn.MultiheadAttention runs", {}
        elif need_weights:
            backend, why, rejected = "math", "need_weights=True: weights come from the explicit path (pass need_weights=False)", {}
        elif cfg.backend == "auto":
            choice = select_backend(spec)
            backend, why, rejected = choice.chosen, f"auto: {choice.rule}", dict(choice.rejected)
        else:
            backend, why, rejected = cfg.backend, f"forced: backend={cfg.backend!r}", {}
        uses.append(BackendUse(path, backend, why, rejected, site.describe(query.dtype)))

    return hook


def measure_latency(original: nn.Module, optimized: nn.Module, args: tuple, kwargs: dict, *, config: OptimizeConfig) -> Latency:
    """Inference latency of ``original`` (in the target dtype, eager) and ``optimized`` on the same inputs."""
    from attnkit.bench import time_fn

    baseline = _in_dtype(original, config.dtype)
    baseline.eval()
    optimized.eval()
    a, k = cast_floating(args, config.dtype), cast_floating(kwargs, config.dtype)
    with torch.inference_mode():
        before = time_fn(lambda: baseline(*a, **k), warmup=config.warmup, repeats=config.repeats)
        after = time_fn(lambda: optimized(*a, **k), warmup=config.warmup, repeats=config.repeats)
    dtype = dtype_name(config.dtype or model_dtype(optimized))
    return Latency(str(model_device(optimized)), dtype, before.median_ms, after.median_ms, config.compile != "none", before.clock)
