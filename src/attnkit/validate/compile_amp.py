"""torch.compile and autocast: the model compiles, runs, and stays within tolerance.

Each check compares the model's main output against the float64 model with the accuracy
stage's rule (``error <= k * baseline + floor``, see ``accuracy.py``):

- ``compile:<backend>``: ``torch.compile(model, backend=...)`` in the validated dtype, against
  the eager model in that dtype. The ladder goes ``aot_eager`` (tracing and autograd, no code
  generation) then ``inductor``. On CPU, inductor compiles C++ for minutes on a small machine,
  so compile checks are skipped there with that reason unless ``compile_on_cpu``.
- ``autocast:<dtype>``: the float32 model under ``torch.autocast(dtype)`` against the model
  cast to that dtype (autocast keeps softmax and norms in float32, so it should do no worse).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from attnkit.bench import time_fn
from attnkit.utils.dtypes import parse_dtype
from attnkit.validate.accuracy import ErrorStats, error_stats, low_precision_copy, model_output
from attnkit.validate.config import ValidateConfig

__all__ = ["CompileAmpResult", "check_compile", "check_autocast"]


@dataclass
class CompileAmpResult:
    """One compile or autocast check."""

    check: str
    """``"compile:aot_eager"``, ``"compile:inductor"``, ``"autocast:bfloat16"``, ..."""
    status: str
    """``"pass"``, ``"fail"`` (raised or out of tolerance) or ``"skip"`` (see ``reason``)."""
    reason: str | None = None
    error: ErrorStats | None = None
    first_call_s: float | None = None
    """Wall time of the first call (compilation included)."""
    median_ms: float | None = None
    eager_median_ms: float | None = None


def _judge(result: CompileAmpResult, error: ErrorStats, what: str) -> CompileAmpResult:
    result.error = error
    if not error.passed:
        result.status = "fail"
        result.reason = f"output error {error.max_abs:.3g} exceeds the rule against {what} {error.baseline_abs:.3g}"
    return result


def check_compile(model, inputs, kwargs, reference: torch.Tensor, dtype: torch.dtype, config: ValidateConfig, device: torch.device) -> list[CompileAmpResult]:
    """Compile ``model`` (in ``dtype``) with each of ``config.compile_backends``; see the module doc."""
    names = [f"compile:{backend}" for backend in config.compile_backends]
    if device.type == "cpu" and not config.compile_on_cpu:
        reason = "cpu: compiling a whole model takes minutes on a small CPU; set compile_on_cpu=True to run it"
        return [CompileAmpResult(name, "skip", reason) for name in names]
    eager = low_precision_copy(model, dtype).eval()
    eager_out = model_output(eager, inputs, kwargs, dtype)
    eager_ms = time_fn(lambda: model_output(eager, inputs, kwargs, dtype), warmup=2, repeats=config.repeats, device=device).median_ms
    results = []
    for backend, name in zip(config.compile_backends, names):
        result = CompileAmpResult(name, "pass", eager_median_ms=eager_ms)
        torch._dynamo.reset()
        try:
            compiled = torch.compile(copy.deepcopy(eager), backend=backend)
            start = time.perf_counter()
            out = model_output(compiled, inputs, kwargs, dtype)
            result.first_call_s = time.perf_counter() - start
            result.median_ms = time_fn(lambda: model_output(compiled, inputs, kwargs, dtype), warmup=2, repeats=config.repeats, device=device).median_ms
        except Exception as error:  # a model that does not compile is a finding, not a crash
            result.status, result.reason = "fail", f"raised {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        else:
            _judge(result, error_stats(out, eager_out, reference, config.tolerance_factor), "eager")
        results.append(result)
    torch._dynamo.reset()
    return results


def check_autocast(model, inputs, kwargs, reference: torch.Tensor, config: ValidateConfig, device: torch.device) -> list[CompileAmpResult]:
    """Run the float32 model under ``torch.autocast`` for each of ``config.amp_dtypes``."""
    full = low_precision_copy(model, torch.float32)
    results = []
    for name in config.amp_dtypes:
        dtype = parse_dtype(name, "amp_dtypes")
        result = CompileAmpResult(f"autocast:{name}", "pass")
        try:
            with torch.autocast(device.type, dtype=dtype):
                start = time.perf_counter()
                out = model_output(full, inputs, kwargs, torch.float32)
                result.first_call_s = time.perf_counter() - start
            cast_out = model_output(low_precision_copy(model, dtype), inputs, kwargs, dtype)
        except Exception as error:
            result.status, result.reason = "fail", f"raised {type(error).__name__}: {error}"
        else:
            _judge(result, error_stats(out, cast_out, reference, config.tolerance_factor), f"the model cast to {name}")
        results.append(result)
    return results
