"""Accuracy: every backend's output and q/k/v gradients against the float64 reference.

The acceptance rule is FlashAttention's own: in the dtype under test, a backend's max
absolute error against float64 may be at most ``k`` (default 2) times the error of PyTorch's
math algorithm in the same dtype (``attnkit.ops`` backend ``math``, with SDPA's fp16/bf16
reduced-precision math allowed, so it really rounds like a plain low-precision
implementation), plus a floor: twice the rounding error of representing the reference
values in that dtype (``2 * max|(ref + 0.3 - 0.3) - ref|``, also from FlashAttention's tests)
plus ``16 * eps(float32) * max|ref|``, because every kernel accumulates in float32 in its own
order. The floor matters only in float32, where the math error is itself a few ulps and the
ratio of two ulp-level errors is noise (a CPU flash kernel measured 3.6x there); a real fault
is orders of magnitude above it (in float32 the planted faults err by >= 1e-3 x max|ref|).

Inputs are fresh normal random tensors each run (never zeros; the seed is reported and
``ValidateConfig.seed`` pins it) in each layer's real shape and dtype, with the features
faults hide in: a random mask with masked entries (additive ones also carry a random
bias), causal with ``Sq != Skv`` next to ``Sq == Skv``, and GQA head counts. All backends
see the same low-precision inputs; the reference sees those inputs upcast to float64.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping

import torch

from attnkit.errors import UnsupportedError
from attnkit.ops import AttentionSpec, attention, backend_support
from attnkit.utils.dtypes import dtype_name
from attnkit.utils.modules import model_dtype
from attnkit.utils.trees import cast_floating
from attnkit.validate.config import BackendFn, ValidateConfig
from attnkit.validate.intercept import force_backend
from attnkit.validate.sites import AttentionLayer

__all__ = [
    "ErrorStats",
    "AccuracyResult",
    "Case",
    "accuracy_cases",
    "describe_spec",
    "make_inputs",
    "low_precision_math",
    "check_attention",
    "check_model_output",
    "run_accuracy",
    "model_output",
    "cast_inputs",
    "error_stats",
    "reference_output",
    "low_precision_copy",
]

QUANTITIES = ("out", "dq", "dk", "dv")
_FP32_EPS = torch.finfo(torch.float32).eps
_ACCUMULATION_ULPS = 16  # float32 kernels differ from math by their summation order: a few ulps of |ref|


@dataclass
class ErrorStats:
    """Error of one quantity (``out``, ``dq``, ``dk``, ``dv``) against the float64 reference."""

    max_abs: float
    max_rel: float
    """``max_abs / max|reference|`` (normwise, so it is defined where the reference is ~0)."""
    baseline_abs: float
    """Max abs error of the math backend in the same dtype."""
    floor: float
    ratio: float
    """``max_abs / baseline_abs`` (inf when the baseline is exact and this is not)."""
    passed: bool


@dataclass
class AccuracyResult:
    """One backend on one case (a layer's call shape, or the whole model's output)."""

    backend: str
    case: str
    layers: list[str]
    spec: dict | None
    status: str
    """``"pass"``, ``"fail"`` (wrong numbers or raised), or ``"skip"`` (cannot run these inputs; see ``reason``)."""
    reason: str | None = None
    errors: dict[str, ErrorStats] = field(default_factory=dict)

    @property
    def worst_ratio(self) -> float | None:
        return max((e.ratio for e in self.errors.values()), default=None)


@dataclass(frozen=True)
class Case:
    """One attention call to test: a layer group's spec (with the layers' real ``scale``)."""

    spec: AttentionSpec
    scale: float | None = None
    """The layers' softmax scale; None = ``1/sqrt(D)`` (T5, for one, uses 1.0)."""

    @property
    def text(self) -> str:
        return describe_spec(self.spec) + (f" scale={self.scale:g}" if self.scale is not None else "")


def accuracy_cases(layers: list[AttentionLayer], max_batch: int) -> dict[Case, list[str]]:
    """The cases to test, each with the layer names it covers: every layer group's call with
    requires_grad, batch capped, dropout off; causal calls also with ``Sq != Skv`` (bottom-right)."""
    cases: dict[Case, list[str]] = {}
    for layer in layers:
        spec = replace(layer.attention_spec, batch=min(layer.attention_spec.batch, max_batch), dropout_p=0.0, dropout_mask=False, requires_grad=True)
        variants = [spec]
        if spec.causal and spec.seq_q == spec.seq_kv and spec.seq_kv > 2:
            variants.append(replace(spec, seq_q=spec.seq_kv // 2 + 1))
        for variant in variants:
            cases.setdefault(Case(variant, layer.scale), []).extend(layer.names)
    return cases


def describe_spec(spec: AttentionSpec) -> str:
    """``B2 H12/4 S128x256 D64 bf16 bool-mask causal``."""
    heads = f"H{spec.heads_q}" + (f"/{spec.heads_kv}" if spec.heads_kv != spec.heads_q else "")
    dims = f"D{spec.head_dim}" + (f"/{spec.head_dim_v}" if spec.head_dim_v != spec.head_dim else "")
    text = f"B{spec.batch} {heads} S{spec.seq_q}x{spec.seq_kv} {dims} {dtype_name(spec.dtype)}"
    return text + (f" {spec.mask}-mask" if spec.mask != "none" else "") + (" causal" if spec.causal else "")


def make_inputs(spec: AttentionSpec, seed: int, device: torch.device | str) -> dict[str, Any]:
    """Random ``q, k, v, grad_out`` (in ``spec.dtype``) and ``mask`` for ``spec`` from ``seed``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = {
        "q": (spec.batch, spec.heads_q, spec.seq_q, spec.head_dim),
        "k": (spec.batch, spec.heads_kv, spec.seq_kv, spec.head_dim),
        "v": (spec.batch, spec.heads_kv, spec.seq_kv, spec.head_dim_v),
        "grad_out": (spec.batch, spec.heads_q, spec.seq_q, spec.head_dim_v),
    }
    inputs: dict[str, Any] = {n: torch.randn(s, generator=gen, device=device, dtype=spec.dtype) for n, s in shapes.items()}
    inputs["mask"] = None
    if spec.mask != "none":
        allowed = torch.rand((spec.batch, 1, spec.seq_q, spec.seq_kv), generator=gen, device=device) > 0.3
        allowed[..., 0] = True  # no empty rows: kernels legitimately differ there
        if spec.mask == "bool":
            inputs["mask"] = allowed
        else:
            bias = torch.randn(allowed.shape, generator=gen, device=device, dtype=spec.dtype)
            inputs["mask"] = bias.masked_fill(~allowed, float("-inf"))
    return inputs


@contextlib.contextmanager
def low_precision_math() -> Iterator[None]:
    """Let SDPA's math kernel compute fp16/bf16 in that dtype (it upcasts to fp32 by default)."""
    allowed = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        yield
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(allowed)


def _run(backend: str | BackendFn, inputs: dict, case: Case, upcast: bool = False, grads: bool = True) -> dict[str, torch.Tensor]:
    """Output and (with ``grads``) q/k/v gradients of one backend (float64 inputs when ``upcast``)."""
    q, k, v, grad_out = (inputs[n].double() if upcast else inputs[n] for n in ("q", "k", "v", "grad_out"))
    q, k, v = (t.detach().requires_grad_(grads) for t in (q, k, v))
    kwargs = dict(mask=inputs["mask"], causal=case.spec.causal, scale=case.scale, dropout_p=0.0, dropout_mask=None, return_lse=False)
    with torch.enable_grad():
        out = backend(q, k, v, **kwargs) if callable(backend) else attention(q, k, v, backend=backend, **kwargs)
        if not grads:
            return {"out": out.detach()}
        if not out.requires_grad:
            raise RuntimeError("the output does not require grad: the backend detached it from q, k, v")
        grads = torch.autograd.grad(out, (q, k, v), grad_out, allow_unused=True)
    results = {"out": out.detach()}
    for name, grad, like in zip(("dq", "dk", "dv"), grads, (q, k, v)):
        results[name] = torch.zeros_like(like) if grad is None else grad
    return results


def error_stats(actual: torch.Tensor, baseline: torch.Tensor, reference: torch.Tensor, factor: float) -> ErrorStats:
    """Max abs/rel error of ``actual`` and of ``baseline`` against the float64 ``reference``, and the pass rule."""
    if not torch.isfinite(actual).all():
        return ErrorStats(math.inf, math.inf, 0.0, 0.0, math.inf, False)
    max_abs = (actual.double() - reference).abs().max().item()
    baseline_abs = (baseline.double() - reference).abs().max().item()
    rounded = (reference.to(actual.dtype) + 0.3 - 0.3).double()
    scale = reference.abs().max().item()
    floor = 2.0 * (rounded - reference).abs().max().item() + _ACCUMULATION_ULPS * _FP32_EPS * scale
    ratio = max_abs / baseline_abs if baseline_abs > 0 else (0.0 if max_abs == 0 else math.inf)
    passed = max_abs <= factor * baseline_abs + floor
    return ErrorStats(max_abs, max_abs / scale if scale > 0 else max_abs, baseline_abs, floor, ratio, passed)


def _support(name: str | None, spec: AttentionSpec) -> str | None:
    return None if name is None else backend_support(spec).get(name)


def check_attention(
    case: Case,
    backends: Mapping[str, str | BackendFn],
    *,
    seed: int,
    device: torch.device | str,
    factor: float = 2.0,
    layers: list[str] | None = None,
) -> list[AccuracyResult]:
    """Test each backend (label -> name in BACKENDS or callable) on one case; see the module doc."""
    spec = case.spec
    inputs = make_inputs(spec, seed, device)
    reference = _run("reference", inputs, case, upcast=True)
    with low_precision_math():
        baseline = _run("math", inputs, case)
    results = []
    for label, backend in backends.items():
        result = AccuracyResult(label, case.text, list(layers or []), spec.to_json(), "pass")
        name = None if callable(backend) else backend
        reason = _support(name, spec)
        forward_only = reason is not None and _support(name, replace(spec, requires_grad=False)) is None
        if reason is not None and not forward_only:
            result.status, result.reason = "skip", reason
            results.append(result)
            continue
        try:
            actual = _run(backend, inputs, case, grads=not forward_only)
        except UnsupportedError as error:
            result.status, result.reason = "skip", str(error)
        except Exception as error:  # a backend that crashes on supported inputs fails
            result.status, result.reason = "fail", f"raised {type(error).__name__}: {error}"
        else:
            result.errors = {n: error_stats(actual[n], baseline[n], reference[n], factor) for n in actual}
            failed = [n for n in actual if not result.errors[n].passed]
            if forward_only:
                result.reason = f"forward only: {reason}"
            if failed:
                result.status = "fail"
                result.reason = "; ".join(
                    f"{n} error {result.errors[n].max_abs:.3g} > {factor:g} x math {result.errors[n].baseline_abs:.3g} + floor {result.errors[n].floor:.2g}"
                    for n in failed
                )
        results.append(result)
    return results


def _first_tensor(output: Any) -> torch.Tensor:
    """The main output of a model: a tensor, the first value of a dict/ModelOutput, or the first item."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) or hasattr(output, "values"):
        return _first_tensor(next(iter(output.values())))
    return _first_tensor(output[0])


def cast_inputs(values: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in ``values`` (tuple or dict) cast to ``dtype``; token ids and masks kept."""
    return cast_floating(values, dtype)


def model_output(model: torch.nn.Module, inputs: tuple, kwargs: dict, dtype: torch.dtype, backend: Any = None) -> torch.Tensor:
    """The model's main output in ``dtype`` (no grad), with every SDPA call forced to ``backend`` if given."""
    context = force_backend(backend) if backend is not None else contextlib.nullcontext()
    with torch.no_grad(), context:
        return _first_tensor(model(*cast_inputs(inputs, dtype), **cast_inputs(kwargs, dtype))).detach()


def reference_output(model: torch.nn.Module, inputs: tuple, kwargs: dict) -> torch.Tensor:
    """The main output of a float64 copy of ``model``: the ground truth for model-level checks."""
    return model_output(copy.deepcopy(model).double(), inputs, kwargs, torch.float64)


def low_precision_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` itself if its weights are in ``dtype``, else a copy cast to ``dtype``."""
    return model if model_dtype(model) == dtype else copy.deepcopy(model).to(dtype)


def check_model_output(
    model: torch.nn.Module,
    inputs: tuple,
    kwargs: dict,
    backends: Mapping[str, str | BackendFn],
    dtype: torch.dtype,
    reference: torch.Tensor,
    factor: float = 2.0,
) -> list[AccuracyResult]:
    """The whole model's output with each backend forced for every SDPA call, against
    ``reference`` (see ``reference_output``); baseline = the model in ``dtype`` with math forced."""
    low = low_precision_copy(model, dtype)
    with low_precision_math():
        baseline = model_output(low, inputs, kwargs, dtype, "math")
    results = []
    for label, backend in backends.items():
        result = AccuracyResult(label, f"model output {dtype_name(dtype)}", ["<model>"], None, "pass")
        try:
            actual = model_output(low, inputs, kwargs, dtype, backend)
        except UnsupportedError as error:
            result.status, result.reason = "skip", str(error)
        except Exception as error:
            result.status, result.reason = "fail", f"raised {type(error).__name__}: {error}"
        else:
            result.errors = {"out": error_stats(actual, baseline, reference, factor)}
            if not result.errors["out"].passed:
                stats = result.errors["out"]
                result.status = "fail"
                result.reason = f"output error {stats.max_abs:.3g} > {factor:g} x math {stats.baseline_abs:.3g} + floor {stats.floor:.2g}"
        results.append(result)
    return results


def run_accuracy(layers: list[AttentionLayer], backends: Mapping[str, Any], config: ValidateConfig, seed: int, device) -> list[AccuracyResult]:
    """``check_attention`` over ``accuracy_cases(layers)``, with a distinct seed per case."""
    results = []
    for index, (case, names) in enumerate(accuracy_cases(layers, config.accuracy_max_batch).items()):
        results.extend(check_attention(case, backends, seed=seed + index, device=device, factor=config.tolerance_factor, layers=names))
    return results
