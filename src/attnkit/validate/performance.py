"""Performance: latency, throughput, TFLOP/s and peak memory per backend.

Two scopes: each attention layer's call over a batch x sequence sweep (every backend, the
``math`` baseline and ``default``: what the layer runs today, i.e. PyTorch's own SDPA choice,
or explicit softmax for layers that never reach SDPA), and the whole model's forward with each
backend forced against its default. Timing is ``attnkit.bench.time_fn`` (CUDA events per call,
warm-up, median/p95/p99); on CPU results carry ``clock="cpu-wall"`` and memory is not measured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from attnkit.bench import time_fn
from attnkit.errors import UnsupportedError
from attnkit.ops import AttentionSpec, attention, backend_support
from attnkit.ops.masks import merged_mask
from attnkit.validate.accuracy import cast_inputs, describe_spec, make_inputs
from attnkit.validate.config import ValidateConfig
from attnkit.validate.intercept import force_backend, pass_through
from attnkit.validate.sites import AttentionLayer

__all__ = ["PerfResult", "sweep_specs", "time_layers", "time_model"]

DEFAULT = "default"


@dataclass
class PerfResult:
    """One backend at one shape; ``scope`` is ``"layer"`` (one attention call) or ``"model"`` (a forward)."""

    scope: str
    backend: str
    case: str
    layer: str
    """First layer name of the group timed (``"<model>"`` for the model scope)."""
    batch: int
    seq: int
    status: str
    """``"ok"``, ``"skip"`` (cannot run, see ``reason``) or ``"error"``."""
    reason: str | None = None
    median_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    throughput: float | None = None
    """Tokens (layer: B * Sq) or samples (model) per second at the median."""
    tflops: float | None = None
    peak_mem_mb: float | None = None
    """Peak CUDA memory above what was allocated before the call; None on CPU."""
    clock: str | None = None


def sweep_specs(layers: list[AttentionLayer], config: ValidateConfig, on_cpu: bool) -> list[tuple[AttentionLayer, AttentionSpec]]:
    """Each layer group's call at its own shape, plus the batch x seq sweep (skipped on CPU
    unless ``config.cpu_sweep``); self-attention gets ``Sq = Skv = seq``."""
    result = []
    for layer in layers:
        spec = replace(layer.attention_spec, dropout_p=0.0, requires_grad=config.time_backward)
        shapes = {(spec.batch, spec.seq_q, spec.seq_kv)}
        if config.cpu_sweep or not on_cpu:
            shapes |= {(b, s, s) for b in config.perf_batches for s in config.perf_seqs}
        for batch, seq_q, seq_kv in sorted(shapes):
            result.append((layer, replace(spec, batch=batch, seq_q=seq_q, seq_kv=seq_kv)))
    return result


def _peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _default_sdpa(q, k, v, *, mask, causal, scale, **_):
    """The call as the layer makes it today: unforced SDPA. The spec's causal is attnkit's bottom-right
    rule; SDPA's ``is_causal`` is top-left, so with ``Sq != Skv`` it goes in as an explicit mask."""
    if causal and q.shape[2] != k.shape[2]:
        mask, causal = merged_mask(mask, True, q.shape[2], k.shape[2], dtype=q.dtype, device=q.device), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _measure(fn: Callable[[], Any], config: ValidateConfig, device: torch.device) -> dict:
    timing = time_fn(fn, warmup=config.warmup, repeats=config.repeats, device=device)
    return dict(median_ms=timing.median_ms, p95_ms=timing.p95_ms, p99_ms=timing.p99_ms, clock=timing.clock, peak_mem_mb=_peak_memory_mb(fn, device))


def _layer_fn(backend: Any, layer: AttentionLayer, spec: AttentionSpec, inputs: dict, backward: bool) -> Callable[[], Any]:
    q, k, v = (inputs[n].requires_grad_(backward) for n in ("q", "k", "v"))
    kwargs = dict(mask=inputs["mask"], causal=spec.causal, scale=layer.scale, dropout_p=0.0, dropout_mask=None, return_lse=False)
    call = (lambda: backend(q, k, v, **kwargs)) if callable(backend) else (lambda: attention(q, k, v, backend=backend, **kwargs))
    if not backward:
        return call
    return lambda: torch.autograd.grad(call(), (q, k, v), inputs["grad_out"])


def time_layers(
    layers: list[AttentionLayer],
    backends: Mapping[str, Any],
    config: ValidateConfig,
    device: torch.device,
    progress: Callable[[str], None] = lambda _: None,
) -> list[PerfResult]:
    """Time every backend (label -> name or callable) and ``default`` on ``sweep_specs``."""
    results = []
    for layer, spec in sweep_specs(layers, config, device.type == "cpu"):
        text = describe_spec(spec)
        default = "math" if layer.blockers else _default_sdpa
        support = backend_support(spec)
        inputs = make_inputs(spec, seed=0, device=device)
        for label, backend in {DEFAULT: default, **backends}.items():
            progress(f"timing {label} at {text}")
            result = PerfResult("layer", label, text, layer.names[0], spec.batch, spec.seq_q, "ok")
            reason = support.get(backend) if isinstance(backend, str) else None
            if reason is not None:
                result.status, result.reason = "skip", reason
            else:
                try:
                    stats = _measure(_layer_fn(backend, layer, spec, inputs, config.time_backward), config, device)
                except UnsupportedError as error:
                    result.status, result.reason = "skip", str(error)
                except Exception as error:  # report and go on: one broken backend must not end the run
                    result.status, result.reason = "error", f"{type(error).__name__}: {error}"
                else:
                    seconds = stats["median_ms"] / 1e3
                    result = replace(
                        result,
                        **stats,
                        throughput=spec.batch * spec.seq_q / seconds,
                        tflops=spec.flops(backward=config.time_backward) / seconds / 1e12,
                    )
            results.append(result)
    return results


def time_model(
    model: torch.nn.Module,
    inputs: tuple,
    kwargs: dict,
    backends: Mapping[str, Any],
    config: ValidateConfig,
    device: torch.device,
    dtype: torch.dtype,
    seq: int,
) -> list[PerfResult]:
    """Forward latency of the whole model as it is (``default``) and with each backend forced;
    ``seq`` (the attention sequence length) labels the results."""
    inputs, kwargs = cast_inputs(inputs, dtype), cast_inputs(kwargs, dtype)
    batch = next((x.shape[0] for x in (*inputs, *kwargs.values()) if isinstance(x, torch.Tensor)), 1)
    results = []
    for label, backend in {DEFAULT: None, **backends}.items():
        # The default runs intercepted too, so every row pays the same interception cost.
        context = (lambda: force_backend(backend)) if backend is not None else pass_through

        def forward():
            with torch.no_grad(), context():
                return model(*inputs, **kwargs)

        result = PerfResult("model", label, "model forward", "<model>", batch, seq, "ok")
        try:
            stats = _measure(forward, config, device)
        except UnsupportedError as error:
            result.status, result.reason = "skip", str(error)
        except Exception as error:
            result.status, result.reason = "error", f"{type(error).__name__}: {error}"
        else:
            result = replace(result, **stats, throughput=batch / (stats["median_ms"] / 1e3))
        results.append(result)
    return results
