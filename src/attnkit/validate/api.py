"""`validate()`: run the stages on a model and return a `ValidationReport`."""

from __future__ import annotations

import datetime
import functools
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from attnkit.errors import check_arg, check_type
from attnkit.ops import BACKENDS
from attnkit.utils.dtypes import dtype_name, parse_dtype
from attnkit.utils.trees import cast_floating
from attnkit.validate.accuracy import cast_inputs, check_model_output, low_precision_copy, reference_output, run_accuracy
from attnkit.validate.compatibility import environment, layer_support
from attnkit.validate.compile_amp import check_autocast, check_compile
from attnkit.validate.config import STAGES, ValidateConfig
from attnkit.validate.performance import time_layers, time_model
from attnkit.validate.recommend import recommend
from attnkit.validate.report import ValidationReport
from attnkit.validate.sites import find_layers

__all__ = ["validate"]

def _load_model(model_or_name: Any, example_inputs, example_kwargs, dtype, device, batch_size, seq_len) -> tuple[str, nn.Module, tuple, dict]:
    if isinstance(model_or_name, str):
        from attnkit.models import build_model

        zoo = build_model(model_or_name, batch_size=batch_size or 1, seq_len=seq_len, dtype=dtype, device=device)
        return zoo.name, zoo.model, zoo.example_inputs, zoo.example_kwargs
    # A model and inputs the user built (on the CPU, typically) follow the model to ``device``, the default
    # CUDA GPU where there is one: weights and inputs on two devices would fail in the first forward.
    if hasattr(model_or_name, "example_inputs") and isinstance(getattr(model_or_name, "model", None), nn.Module):  # a ZooModel
        zoo = model_or_name
        inputs, kwargs = cast_floating(tuple(zoo.example_inputs), device=device), cast_floating(dict(zoo.example_kwargs), device=device)
        return zoo.name, zoo.model.to(device), inputs, kwargs
    check_type(model_or_name, nn.Module, "model_or_name", "Pass a zoo name (see attnkit.models.list_models()), a ZooModel or an nn.Module.")
    check_arg(example_inputs is not None, "example_inputs", "a tuple of inputs for an nn.Module", None, "validate(model, example_inputs=(x,))")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    return type(model_or_name).__name__, model_or_name.eval().to(device), cast_floating(inputs, device=device), cast_floating(kwargs, device=device)


def _accepts_sdpa(model: nn.Module) -> bool:
    """Whether transformers lets this model class run ``attn_implementation='sdpa'`` (asked, not set)."""
    ask = getattr(model, "get_correct_attn_implementation", None)
    if ask is None:  # transformers releases without the query
        return bool(getattr(model, "_supports_sdpa", False))
    try:
        return ask("sdpa", is_init_check=True) == "sdpa"
    except (ValueError, ImportError):
        return False


def _model_notes(model: nn.Module, layers, discovery: list[str]) -> list[str]:
    """What the report should say about the model itself; ``discovery``: ``find_layers``' notes."""
    notes = []
    attn_impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if not (layers or discovery):
        attn_impl = None  # nothing attention-like seen (a state-space model): no advice about how attention runs
    if attn_impl == "eager" and _accepts_sdpa(model):
        notes.append("The transformers model runs attn_implementation='eager' (matmul + softmax): load it with attn_implementation='sdpa' so fused kernels can run.")
    elif attn_impl == "eager":
        import transformers

        notes.append(f"The transformers model runs attn_implementation='eager' (matmul + softmax), the only implementation {type(model).__name__} "
                     f"offers in transformers {transformers.__version__}: no fused kernel can run its attention as written.")
    if not layers:
        graph = "; ".join(discovery) if discovery else "graph capture found none"
        notes.append(f"No attention layer found: the model makes no F.scaled_dot_product_attention call, has no nn.MultiheadAttention, and {graph}.")
    return notes


@dataclass
class _Run:
    """What the stages share: the model in the validated dtype, its inputs, layers and backends."""

    model: nn.Module
    inputs: tuple
    kwargs: dict
    layers: list
    backends: dict
    config: ValidateConfig
    device: torch.device
    dtype: torch.dtype
    seed: int
    reference_error: str = ""
    """Why the model has no float64 reference output (empty while it has one)."""

    @functools.cached_property
    def reference(self) -> torch.Tensor | None:
        """The main output of the model in float64, or None when it cannot run in float64 (``reference_error`` says why)."""
        try:
            return reference_output(self.model, self.inputs, self.kwargs)
        except Exception as error:  # noqa: BLE001 - some kernels take no float64 (grouped_mm in MoE layers): checks against it are skipped
            self.reference_error = f"the model cannot run in float64 for a reference output ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
            return None

    @property
    def routable(self) -> bool:
        """Some layer calls SDPA, so forcing a backend changes the model."""
        return any(not layer.blockers for layer in self.layers)

    def accuracy(self, report: ValidationReport) -> None:
        report.accuracy = run_accuracy(self.layers, self.backends, self.config, self.seed, self.device)
        if self.config.model_output and self.routable:
            if self.reference is None:
                report.model_notes.append(f"Whole-model output checks skipped: {self.reference_error}.")
                return
            report.accuracy += check_model_output(self.model, self.inputs, self.kwargs, self.backends, self.dtype, self.reference, self.config.tolerance_factor)

    def performance(self, report: ValidationReport, progress: Callable[[str], None]) -> None:
        report.performance = time_layers(self.layers, self.backends, self.config, self.device, progress)
        if self.routable and self.config.time_model:
            seq = self.layers[0].attention_spec.seq_q
            report.performance += time_model(self.model, self.inputs, self.kwargs, self.backends, self.config, self.device, self.dtype, seq)

    def compile_amp(self, report: ValidationReport) -> None:
        if self.reference is None:
            report.skipped["compile_amp"] = self.reference_error
            return
        report.compile_amp = check_compile(self.model, self.inputs, self.kwargs, self.reference, self.dtype, self.config, self.device)
        report.compile_amp += check_autocast(self.model, self.inputs, self.kwargs, self.reference, self.config, self.device)


def validate(
    model_or_name: str | nn.Module | Any,
    *,
    example_inputs: tuple | torch.Tensor | None = None,
    example_kwargs: dict | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    device: str | torch.device | None = None,
    config: ValidateConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> ValidationReport:
    """Check which attention backends a model can use, whether they are numerically right for its
    shapes and dtype (forward and gradients, and the whole model's output), how fast they are,
    whether the model survives torch.compile and autocast, and what to change.

    Args:
        model_or_name: a zoo name (``"bert-base"``, ``"vit_b_16"``, ...), a ``ZooModel``, or an
            ``nn.Module`` with ``example_inputs``.
        example_inputs / example_kwargs: inputs of ``model(*inputs, **kwargs)`` for an ``nn.Module``.
        dtype: ``bf16``/``fp16``/``fp32``; default bf16 on CUDA, fp32 on CPU. The model is validated in it.
        batch_size / seq_len: shape of the zoo model's example inputs (zoo names only).
        device: default ``cuda`` when available.
        config: :class:`ValidateConfig` (default: ``ValidateConfig.preset("default")``).
        progress: called with a short line before each long step (the CLI shows it).

    Returns:
        A :class:`ValidationReport`; ``report.passed`` is False when any backend failed accuracy or
        no attention was found (``report.verdict`` says which).

    Example::

        report = validate("bert-base", dtype="bf16", config=ValidateConfig.preset("quick"))
        report.save("bert.json"); print(report.to_markdown())
    """
    config = config or ValidateConfig.preset("default")
    check_type(config, ValidateConfig, "config")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    progress = progress or (lambda _: None)
    started = time.perf_counter()
    name, model, inputs, kwargs = _load_model(model_or_name, example_inputs, example_kwargs, dtype, device, batch_size, seq_len)
    model, inputs, kwargs = low_precision_copy(model, dtype), cast_inputs(inputs, dtype), cast_inputs(kwargs, dtype)
    seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(4), "little")
    report = ValidationReport(
        model=name,
        dtype=dtype_name(dtype),
        device=device.type,
        seed=seed,
        config=config.to_json(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    backends = {**{n: n for n in config.backend_names(BACKENDS)}, **config.extra_backends}
    stage_start = started

    def stage_done(stage: str) -> None:
        nonlocal stage_start
        report.stage_seconds[stage] = time.perf_counter() - stage_start
        stage_start = time.perf_counter()

    stage_done("load")
    progress("compatibility: finding attention layers")
    discovery: list[str] = []
    layers = find_layers(model, inputs, kwargs, notes=discovery)
    report.model_notes = _model_notes(model, layers, discovery)
    report.attention_calls = sum(len(layer.names) for layer in layers)
    if "compatibility" in config.stages:
        report.environment = environment(device, dtype)
        report.layers = layer_support(layers, tuple(n for n in backends if isinstance(backends[n], str)))
    stage_done("compatibility")
    run = _Run(model, inputs, kwargs, layers, backends, config, device, dtype, seed)
    for stage in STAGES[1:]:
        if stage not in config.stages:
            report.skipped[stage] = "not in config.stages"
            continue
        if not layers:
            report.skipped[stage] = "no attention layer found"
            continue
        progress(f"{stage}: running")
        if stage == "performance":
            run.performance(report, progress)
        else:
            getattr(run, stage)(report)
        stage_done(stage)
    report.recommendations = recommend(report.layers, report.accuracy, report.performance, report.compile_amp, report.model_notes)
    report.seconds = time.perf_counter() - started
    return report
