"""The analysis report: a versioned, JSON-serialisable data structure, its tables and its Markdown form.

Times are seconds, sizes bytes, rates FLOP/s unless a field name says otherwise.
``schema_version`` changes its major number when a field is removed or changes meaning.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

from attnkit.errors import check_arg
from attnkit.utils.tables import Table, markdown_table

if TYPE_CHECKING:
    from attnkit.analyze.cost import KernelCost, ModeCost
    from attnkit.analyze.partition import Kernel
    from attnkit.discover.attention import AttentionSite

__all__ = ["SCHEMA_VERSION", "KernelRow", "ModeSummary", "FusionSaving", "AttentionRow", "AnalysisReport"]

SCHEMA_VERSION = "1.2"


def _build(cls, data: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def _derive(cls, source, **extra):
    """``cls`` from the fields it shares by name with the dataclass ``source``, plus ``extra`` (which wins)."""
    return _build(cls, {**{f.name: getattr(source, f.name) for f in fields(source)}, **extra})


@dataclass(frozen=True)
class KernelRow:
    """One predicted kernel."""

    name: str
    category: str
    layer: str
    ops: tuple[str, ...]
    flops: int
    bytes: int
    weight_bytes: int
    intensity: float
    """FLOPs per byte."""
    bound: str
    """``"compute"`` or ``"memory"``: which roof limits it (attention kernels at the fused-attention rate)."""
    time_s: float
    """Predicted time, launch overhead included."""
    group: str = ""
    """Kernel group for comparison with measurements (:data:`attnkit.analyze.groups.GROUPS`)."""

    @classmethod
    def of(cls, kernel: Kernel, cost: KernelCost, group: str) -> "KernelRow":
        """The row of a partition kernel (its fields by name) with its predicted cost."""
        return _derive(cls, kernel, intensity=kernel.intensity, bound=cost.bound, time_s=cost.time_s, group=group)

    def to_json(self) -> dict:
        return {**asdict(self), "ops": list(self.ops)}


@dataclass(frozen=True)
class ModeSummary:
    """Predicted totals of one execution mode (see :mod:`attnkit.analyze.partition`)."""

    mode: str
    num_kernels: int
    total_flops: int
    total_bytes: int
    device_s: float
    host_s: float
    predicted_s: float
    limiter: str
    """``"device"`` or ``"host"`` (launch-bound)."""
    kernels: tuple[KernelRow, ...] = ()
    host_busy_s: float = 0.0
    """Host dispatch time with the GPU backlogged (``host_s`` is with the GPU idle)."""

    @classmethod
    def of(cls, cost: ModeCost, kernels: tuple[KernelRow, ...]) -> "ModeSummary":
        """The summary of a mode's predicted cost (its fields by name), with its kernels as rows."""
        return _derive(cls, cost, predicted_s=cost.predicted_s, limiter=cost.limiter, kernels=kernels)

    def __repr__(self) -> str:
        return f"ModeSummary({self.mode!r}, kernels={self.num_kernels}, predicted_ms={self.predicted_s * 1e3:.3f})"

    def to_json(self) -> dict:
        return {**asdict(self), "kernels": [k.to_json() for k in self.kernels]}

    @classmethod
    def from_json(cls, data: dict) -> "ModeSummary":
        kernels = tuple(_build(KernelRow, {**k, "ops": tuple(k["ops"])}) for k in data.get("kernels", ()))
        return _build(cls, {**data, "kernels": kernels})


@dataclass(frozen=True)
class FusionSaving:
    """What one fusion step saves over the step before it."""

    step: str
    mode: str
    """The mode this step belongs to."""
    kernels_saved: int
    bytes_saved: int
    time_saved_s: float

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AttentionRow:
    """One attention site with its predicted fused-kernel cost (attention-aware mode)."""

    name: str
    kind: str
    form: str
    causal: bool
    num_heads: int
    num_kv_heads: int
    head_dim_qk: int
    head_dim_v: int
    batch: int
    seq_q: int
    seq_kv: int
    mask: str
    qkv_layout: str
    flops: int
    """Causal halved."""
    bytes: int
    intensity: float
    bound: str
    time_s: float
    steps: tuple[str, ...] = ()
    """Primitive ATen steps of the attention in order (SDPA decomposed, a hand-written chain as captured), e.g.
    ``("transpose", "matmul", "mul", "add", "_safe_softmax", "matmul")``; empty in reports before schema 1.2."""
    fused_kernel: str = ""
    """The attention-aware kernel that absorbs all of ``steps`` (one fused attention kernel)."""

    @classmethod
    def of(cls, site: AttentionSite, **cost) -> "AttentionRow":
        """The row of a discovered site (its shape fields by name) plus ``cost``: the fields after ``qkv_layout``."""
        return _derive(cls, site, **cost)

    def to_json(self) -> dict:
        return {**asdict(self), "steps": list(self.steps)}


@dataclass(frozen=True)
class AnalysisReport:
    """Everything ``attnkit analyze`` found about one model."""

    model: str
    dtype: str
    """Analysis dtype: bytes are counted at its item size, rates taken for it."""
    hardware: dict
    """The :class:`~attnkit.hardware.profiles.HardwareProfile` used, as JSON."""
    flop_convention: str
    total_flops: int
    """FLOPs per forward, causal attention halved."""
    dense_flops: int
    """FLOPs per forward with attention counted non-causal."""
    num_nodes: int
    """ATen nodes in the captured graph."""
    modes: tuple[ModeSummary, ...]
    attention: tuple[AttentionRow, ...]
    savings: tuple[FusionSaving, ...]
    measured: dict = field(default_factory=dict)
    """Optional measurements per mode: ``{"eager": {"kernels": 162, "latency_ms": 7.6, "batch": 1}}``."""
    inputs: dict = field(default_factory=dict)
    """Input shapes by argument name."""
    seconds: dict = field(default_factory=dict)
    """Wall time of each analysis step."""
    notes: tuple[str, ...] = ()

    def mode(self, name: str) -> ModeSummary:
        """The summary of mode ``name``."""
        for summary in self.modes:
            if summary.mode == name:
                return summary
        raise KeyError(f"mode {name!r} not analysed; have {[m.mode for m in self.modes]}")

    def top_kernels(self, mode: str, count: int = 10) -> list[KernelRow]:
        """The ``count`` kernels with the largest predicted time in ``mode``."""
        return sorted(self.mode(mode).kernels, key=lambda k: -k.time_s)[:count]

    def layer_times(self, mode: str) -> dict[str, float]:
        """Predicted seconds per layer (repeated block) in ``mode``, in first-seen order."""
        totals: dict[str, float] = defaultdict(float)
        for kernel in self.mode(mode).kernels:
            totals[kernel.layer] += kernel.time_s
        return dict(totals)

    def __repr__(self) -> str:
        modes = ", ".join(f"{m.mode}={m.num_kernels}k/{m.predicted_s * 1e3:.2f}ms" for m in self.modes)
        return f"AnalysisReport({self.model!r}, GFLOP={self.total_flops / 1e9:.2f}, attention={len(self.attention)}, {modes})"

    def to_json(self) -> dict:
        """A JSON-ready dict with ``"schema_version"``."""
        data = asdict(self)
        data.update(
            modes=[m.to_json() for m in self.modes],
            attention=[a.to_json() for a in self.attention],
            savings=[s.to_json() for s in self.savings],
            notes=list(self.notes),
        )
        return {"schema_version": SCHEMA_VERSION, **data}

    @classmethod
    def from_json(cls, data: dict | str) -> "AnalysisReport":
        """Rebuild a report from :meth:`to_json` output (a dict or a JSON string)."""
        data = json.loads(data) if isinstance(data, str) else data
        version = str(data.get("schema_version", ""))
        check_arg(version.split(".")[0] == SCHEMA_VERSION.split(".")[0], "schema_version",
                  f"major version {SCHEMA_VERSION.split('.')[0]}", version, "Re-run `attnkit analyze` to regenerate it.")
        return _build(cls, {
            **data,
            "modes": tuple(ModeSummary.from_json(m) for m in data["modes"]),
            "attention": tuple(_build(AttentionRow, {**a, "steps": tuple(a.get("steps", ()))}) for a in data["attention"]),
            "savings": tuple(_build(FusionSaving, s) for s in data["savings"]),
            "notes": tuple(data.get("notes", ())),
        })

    def tables(self, top: int = 10) -> list[Table]:
        """The report as ``(title, header, rows)`` tables: totals per mode, fusion savings, attention sites,
        their primitive steps, and the ``top`` slowest kernels of the last mode. The one table source of the
        terminal view, :meth:`to_markdown` and the HTML page (:mod:`attnkit.utils.tables` lays them out)."""
        modes = []
        for m in self.modes:
            got = self.measured.get(m.mode, {})
            modes.append([m.mode, str(m.num_kernels), f"{m.total_bytes / 1e9:.3f}", _ms(m.predicted_s), m.limiter,
                          str(got.get("kernels", "")), _fmt(got.get("latency_ms"))])
        savings = [[s.step, s.mode, str(s.kernels_saved), f"{s.bytes_saved / 1e6:.1f}", _ms(s.time_saved_s)]
                   for s in self.savings]
        attention = [[a.name or "<root>", f"{a.kind}, causal" if a.causal else a.kind, str(a.batch),
                      f"{a.num_heads} ({a.num_kv_heads})", f"{a.seq_q} x {a.seq_kv}", str(a.head_dim_qk), a.mask,
                      a.qkv_layout, f"{a.flops / 1e9:.3f}", a.bound, f"{a.time_s * 1e3:.4f}"] for a in self.attention]
        steps = [[a.name or "<root>", " -> ".join(a.steps), a.fused_kernel] for a in self.attention]
        last = self.modes[-1].mode
        kernels = [[k.name, k.layer, f"{k.flops / 1e9:.3f}", f"{k.bytes / 1e6:.2f}", f"{k.intensity:.1f}", k.bound,
                    f"{k.time_s * 1e3:.4f}"] for k in self.top_kernels(last, top)]
        return [
            ("Totals per mode", ["mode", "kernels", "GB moved", "predicted ms", "limited by", "measured kernels",
                                 "measured ms"], modes),
            ("What each fusion saves", ["step", "mode", "kernels saved", "MB saved", "ms saved"], savings),
            (f"Attention ({len(self.attention)} sites)", ["name", "kind", "B", "heads (kv)", "Sq x Skv", "D", "mask",
                                                          "QKV", "GFLOP", "bound", "ms"], attention),
            ("Attention in primitive steps, and the attention-aware kernel that fuses them",
             ["name", "steps", "fused into"], steps),
            (f"Top kernels by predicted time ({last})", ["kernel", "layer", "GFLOP", "MB", "FLOP/B", "bound", "ms"],
             kernels),
        ]

    def header_lines(self) -> list[str]:
        """Model, hardware, dtype, FLOPs and graph size: the lines above the tables in every rendering."""
        return [
            f"{self.model} on {self.hardware.get('name')} ({self.hardware.get('source')}), dtype {self.dtype}",
            f"{self.total_flops / 1e9:.2f} GFLOP per forward ({self.dense_flops / 1e9:.2f} with attention counted "
            f"non-causal), {self.num_nodes} ATen nodes, {len(self.attention)} attention sites",
            f"FLOPs: {self.flop_convention}",
        ]

    def to_markdown(self) -> str:
        """A Markdown summary: the header lines, then :meth:`tables`, then the notes."""
        lines = [f"# attnkit analyze: {self.model}", ""] + [f"- {line}" for line in self.header_lines()] + [""]
        for table in self.tables():
            lines += markdown_table(*table)
        lines += [f"> {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3f}"
