"""``analyze()``: capture a model, find its attention, spell each site out in primitive steps, partition the
graph per execution mode, cost it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ContextManager

import torch

from attnkit.errors import check_arg, check_type
from attnkit.discover.attention import AttentionSite, find_attention, op_name, unmatched_softmax
from attnkit.discover.capture import capture
from attnkit.discover.decompose import DecomposedGraph, decompose_attention
from attnkit.analyze.cost import ModeCost, estimate
from attnkit.analyze.flops import FLOP_CONVENTION, count_ops
from attnkit.analyze.groups import predicted_group
from attnkit.hardware.profiles import HardwareProfile, dtype_key, stored_profile
from attnkit.analyze.partition import MODES, Partition, fusion_steps, partition
from attnkit.analyze.report import AnalysisReport, AttentionRow, FusionSaving, KernelRow, ModeSummary

__all__ = ["analyze"]

Progress = Callable[[str], ContextManager]
"""Called with a step description; the returned context manager wraps the step (e.g. a spinner)."""
Probe = Callable[[], tuple[torch.nn.Module, Sequence[Any], dict[str, Any]]]
"""Returns ``(model, inputs, kwargs)`` of the analysed model at a short sequence, with real tensors."""

_NOTES = (
    "compiled = torch.compile's default mode: pointwise/reduction chains fused into Triton kernels, views free, "
    "cuBLAS GEMMs, convolutions and SDPA as separate kernels (no GEMM epilogue fusion).",
    "predicted latency = max(device, host_busy + f * (host_idle - host_busy)), f = max(0, 1 - device / host_busy): "
    "device = sum of roofline kernel times + per-kernel launch cost; host = dispatch time per forward.",
)


def analyze(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    example_kwargs: dict[str, Any] | None = None,
    *,
    hardware: str | Path | HardwareProfile = "h100",
    dtype: torch.dtype | None = None,
    modes: Sequence[str] = MODES,
    name: str | None = None,
    measured: dict | None = None,
    progress: Progress | None = None,
    probe: Probe | None = None,
) -> AnalysisReport:
    """Where a model's forward spends FLOPs, bytes, kernels and time, per execution mode.

    Args:
        model: the module; captured in eval mode without changing it.
        example_inputs: positional inputs (a lone tensor is accepted); their shapes fix the analysis.
        example_kwargs: keyword inputs, e.g. ``{"use_cache": False}``.
        hardware: a profile name (``h100``, ``h200``, ``a100``, ``l4``, ``cpu``), a calibrate JSON path, or a profile
            (this machine's: ``attnkit.measure.load_hardware("this")``).
        dtype: analysis dtype (bytes and rates); defaults to the model's parameter dtype. The model is not cast.
        modes: any of ``"eager"``, ``"compiled"``, ``"attention-aware"``.
        name: model name for the report (defaults to the class name).
        measured: measured kernels/latency per mode to show beside the predictions
            (``{"eager": {"kernels": 162, "latency_ms": 7.6, "batch": 1}}``).
        progress: optional step wrapper for a progress display.
        probe: returns ``(model, inputs, kwargs)``: the same model at a short sequence with real tensors.
            Called only when mask values are needed and the example has none (``meta`` tensors) or its
            masks are too large to evaluate (over ``MASK_VALUE_BUDGET`` elements); the masks' values on
            it decide causality and padding (see :mod:`attnkit.discover.attention`). Everything else is
            counted on the example's shapes, so ``model`` and inputs may live on the ``meta`` device.
    Returns:
        An :class:`AnalysisReport`.

    Example::

        report = analyze(model, (pixels,), hardware="h100", dtype=torch.bfloat16)
        print(report.mode("eager").num_kernels, report.total_flops / 1e9)
    """
    check_type(model, torch.nn.Module, "model")
    modes = tuple(modes)
    check_arg(bool(modes) and set(modes) <= set(MODES), "modes", f"a non-empty subset of {MODES}", modes)
    check_arg(not (isinstance(hardware, str) and hardware.lower() == "this"), "hardware",
              "a profile name, a calibrate JSON path or a HardwareProfile", hardware,
              "analyze() does not measure: pass attnkit.measure.load_hardware('this') (calibrated once, then cached).")
    profile = stored_profile(hardware)
    if dtype is not None:
        dtype_key(dtype)  # validate before the slow capture
    step = progress or (lambda _: contextlib.nullcontext())
    seconds: dict[str, float] = {}

    mark = time.perf_counter()
    with step("capturing with torch.export"):
        captured = capture(model, example_inputs, example_kwargs)
    dtype = dtype or captured.dtype
    seconds["capture"], mark = time.perf_counter() - mark, time.perf_counter()
    with step("finding attention"):
        probed: list[str] = []
        sites = find_attention(captured, probe=probe and (lambda: _capture_probe(probe, probed)))
    seconds["find_attention"], mark = time.perf_counter() - mark, time.perf_counter()
    with step("decomposing attention"):
        decomposed = decompose_attention(captured)
    seconds["decompose"], mark = time.perf_counter() - mark, time.perf_counter()
    with step("partitioning and costing"):
        graph = captured.graph_module.graph
        causal = {name for site in sites if site.causal for name in site.core}
        ops = count_ops(graph, dtype, causal)
        steps = [(label, partition(graph, dtype, config, sites=sites, causal_nodes=causal))
                 for label, config in fusion_steps() if config.mode in modes]
        costs = [estimate(part, profile, dtype) for _, part in steps]
    seconds["partition_and_cost"] = time.perf_counter() - mark

    finals = {part.mode: (part, cost) for (_, part), cost in zip(steps, costs)}  # last step of each mode
    summaries = tuple(_summary(part, cost) for part, cost in (finals[m] for m in MODES if m in finals))
    aware = finals.get("attention-aware") or finals[modes[-1]]
    return AnalysisReport(
        model=name or type(model).__name__,
        dtype=str(dtype).removeprefix("torch."),
        hardware=profile.to_json(),
        flop_convention=FLOP_CONVENTION,
        total_flops=sum(op.flops for op in ops),
        dense_flops=sum(op.dense_flops for op in ops),
        num_nodes=captured.num_nodes,
        modes=summaries,
        attention=tuple(_attention_rows(sites, captured.graph_module.graph, decomposed, *aware)),
        savings=tuple(_savings(steps, costs)),
        measured=dict(measured or {}),
        inputs=_shapes(captured.example_inputs, captured.example_kwargs),
        seconds={k: round(v, 3) for k, v in seconds.items()},
        notes=_NOTES + tuple(probed) + _evidence_notes(sites) + _unmatched_notes(graph, sites),
    )


def _capture_probe(probe: Probe, notes: list[str]):
    """Capture the probe; a probe that fails is noted and skipped (masks are then read from the graph)."""
    try:
        model, inputs, kwargs = probe()
        captured = capture(model, inputs, kwargs)
    except Exception as error:  # the probe only refines mask kinds: never lose the analysis to it
        notes.append(f"mask probe failed ({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}).")
        return None
    notes.append(f"mask values read on a probe with inputs {_shapes(captured.example_inputs, captured.example_kwargs)}.")
    return captured


def _evidence_notes(sites) -> tuple[str, ...]:
    if any(site.mask_evidence == "graph" for site in sites):
        return ("some masks have no values (meta tensors or too large) and no probe: their causality comes only "
                "from is_causal flags (mask_evidence='graph').",)
    return ()


def _unmatched_notes(graph: torch.fx.Graph, sites) -> tuple[str, ...]:
    if count := unmatched_softmax(graph, sites):
        return (f"{count} softmax op(s) belong to no attention found here (block-sparse or gathered attention, or a softmax "
                "that is not attention): they are costed as ordinary kernels, not analysed as attention.",)  # fmt: skip
    return ()


def _summary(part: Partition, cost: ModeCost) -> ModeSummary:
    rows = tuple(KernelRow.of(k, c, predicted_group(k)) for k, c in zip(part.kernels, cost.kernels))
    return ModeSummary.of(cost, rows)


def _steps(site: AttentionSite, nodes: dict[str, torch.fx.Node], decomposed: DecomposedGraph) -> tuple[str, ...]:
    """The site's primitive ATen steps: its SDPA node decomposed, or its hand-written chain as captured."""
    replaced = next((decomposed.replaced[name] for name in site.core if name in decomposed.replaced), None)
    if replaced is None:  # already primitive (or an SDPA kernel whose LSE is used: kept fused)
        return tuple(op_name(nodes[name]) for name in site.core)
    new = {node.name: node for node in decomposed.graph_module.graph.nodes}
    return tuple(op_name(new[name]) for name in replaced)


def _attention_rows(sites, graph: torch.fx.Graph, decomposed: DecomposedGraph, part: Partition,
                    cost: ModeCost) -> list[AttentionRow]:
    where = {op: index for index, kernel in enumerate(part.kernels) for op in kernel.ops}
    nodes = {node.name: node for node in graph.nodes}
    rows = []
    for site in sites:
        index = next((where[n] for n in reversed(site.core) if n in where), None)
        kernel = part.kernels[index] if index is not None else None
        rows.append(AttentionRow.of(
            site, flops=kernel.flops if kernel else 0, bytes=kernel.bytes if kernel else 0,
            intensity=kernel.intensity if kernel else 0.0, bound=cost.kernels[index].bound if kernel else "memory",
            time_s=cost.kernels[index].time_s if kernel else 0.0, steps=_steps(site, nodes, decomposed),
            fused_kernel=kernel.name if kernel else "",
        ))
    return rows


def _savings(steps: list[tuple[str, Partition]], costs: list[ModeCost]) -> list[FusionSaving]:
    return [
        FusionSaving(label, part.mode, before.num_kernels - cost.num_kernels, before.total_bytes - cost.total_bytes,
                     before.predicted_s - cost.predicted_s)
        for (label, part), before, cost in zip(steps[1:], costs, costs[1:])
    ]


def _shapes(inputs: tuple, kwargs: dict) -> dict[str, list[int]]:
    named = {f"arg{i}": v for i, v in enumerate(inputs)} | dict(kwargs)
    return {k: list(v.shape) for k, v in named.items() if isinstance(v, torch.Tensor)}
