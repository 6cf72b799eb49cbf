"""`bench_attention()`: every backend (and ``auto``) over a grid of shapes, in TFLOP/s.

FLOPs convention (docs/architecture.md): forward ``4*B*H*Sq*Skv*D`` (2 per multiply-add,
QK^T and PV), halved for causal; backward 2.5x forward, so fwd+bwd is 3.5x forward.
Each shape keeps the token count fixed (``batch = tokens // seq``) and the model width fixed
(``heads = width // head_dim``), as the FlashAttention benchmarks do.
"""

from __future__ import annotations

import datetime
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from attnkit.bench.timing import time_fn
from attnkit.errors import AttnkitError, check_arg
from attnkit.ops import BACKENDS, AttentionSpec, Rule, attention, backend_support, select_backend
from attnkit.utils.dtypes import parse_dtype

__all__ = [
    "AUTO_TOLERANCE",
    "AttentionBench",
    "BenchRecord",
    "BenchShape",
    "ShapeSummary",
    "bench_attention",
    "default_grid",
    "suggest_rules",
]

AUTO_TOLERANCE = 0.02
"""auto meets the goal on a shape when its time is within 2% of the fastest backend's."""
PAIRED_ROUNDS = 3


@dataclass(frozen=True)
class BenchShape:
    """One grid point: ``(batch, heads, seq, head_dim)`` self-attention, one pass."""

    batch: int
    heads: int
    seq: int
    head_dim: int
    causal: bool
    backward: bool
    """False: forward only; True: forward and backward (fwd+bwd)."""

    def spec(self, device: str, dtype: torch.dtype) -> AttentionSpec:
        return AttentionSpec(
            batch=self.batch,
            heads_q=self.heads,
            seq_q=self.seq,
            head_dim=self.head_dim,
            device=device,
            dtype=dtype,
            causal=self.causal,
            requires_grad=self.backward,
        )

    @property
    def label(self) -> str:
        return f"hd{self.head_dim} s{self.seq} {'causal' if self.causal else 'full'} {'fwd+bwd' if self.backward else 'fwd'}"


@dataclass(frozen=True)
class BenchRecord:
    """One backend on one shape: timing and throughput, or why it did not run."""

    shape: BenchShape
    backend: str
    median_ms: float | None = None
    tflops: float | None = None
    skipped: str | None = None
    chosen: str | None = None
    """For ``auto``: the backend it ran."""


@dataclass(frozen=True)
class ShapeSummary:
    """Per shape: the fastest backend and whether auto came within ``AUTO_TOLERANCE`` of it."""

    shape: BenchShape
    best: str | None
    best_tflops: float | None
    auto_chosen: str | None
    auto_tflops: float | None
    auto_within_tolerance: bool | None
    """auto's median time <= best's * (1 + AUTO_TOLERANCE), from the paired timings below."""
    auto_chose_best: bool | None
    paired_auto_ms: float | None = None
    paired_best_ms: float | None = None
    """auto and the best backend re-timed alternately, ``PAIRED_ROUNDS`` rounds each (median of the
    round medians): GPU clocks drift by several percent between measurements minutes apart, which
    is larger than the 2% being judged."""


@dataclass
class AttentionBench:
    """A benchmark run: environment, the grid's records and per-shape summaries."""

    device: str
    torch: str
    date: str
    command: str
    dtype: str
    flops_convention: str
    records: list[BenchRecord] = field(default_factory=list)
    summaries: list[ShapeSummary] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def default_grid(*, quick: bool = False, device: str = "cuda") -> list[BenchShape]:
    """The issue's grid (head dim 64/128, seq 1k..16k, causal and not, fwd and fwd+bwd) at
    16k tokens and width 2048; ``quick`` is a tiny grid (tiny shapes on CPU)."""
    if quick:
        tokens, width = (256, 64) if device == "cpu" else (4096, 2048)
        seqs, head_dims = ((64, 128), (16, 32)) if device == "cpu" else ((1024, 4096), (64, 128))
    else:
        tokens, width, seqs, head_dims = 16384, 2048, (1024, 2048, 4096, 8192, 16384), (64, 128)
    return [
        BenchShape(max(1, tokens // seq), width // head_dim, seq, head_dim, causal, backward)
        for head_dim in head_dims
        for seq in seqs
        for causal in (False, True)
        for backward in (False, True)
    ]


def _measure(shape: BenchShape, backend: str, device: str, dtype: torch.dtype, warmup: int, repeats: int) -> float:
    """Median milliseconds of one call of ``backend`` on fresh random inputs."""
    grad = shape.backward
    q, k, v = (
        torch.randn(shape.batch, shape.heads, shape.seq, shape.head_dim, device=device, dtype=dtype, requires_grad=grad)
        for _ in range(3)
    )

    grad_out = torch.randn_like(q) if grad else None

    def forward():
        return attention(q, k, v, causal=shape.causal, backend=backend)

    def forward_backward():
        torch.autograd.grad(forward(), (q, k, v), grad_out)

    return time_fn(forward_backward if grad else forward, warmup=warmup, repeats=repeats, device=device).median_ms


def _paired(shape: BenchShape, best: str, device: str, dtype: torch.dtype, warmup: int, repeats: int) -> tuple[float, float]:
    """Median ms of ``auto`` and ``best``, timed alternately so both see the same clocks."""
    rounds = [
        (_measure(shape, "auto", device, dtype, warmup, repeats), _measure(shape, best, device, dtype, warmup, repeats))
        for _ in range(PAIRED_ROUNDS)
    ]
    return statistics.median(a for a, _ in rounds), statistics.median(b for _, b in rounds)


def _summarize(shape: BenchShape, records: list[BenchRecord], paired: tuple[float, float] | None) -> ShapeSummary:
    measured = [r for r in records if r.tflops is not None and r.backend != "auto"]
    best = max(measured, key=lambda r: r.tflops, default=None)
    auto = next((r for r in records if r.backend == "auto"), None)
    within = None
    if paired is not None:
        within = paired[0] <= paired[1] * (1 + AUTO_TOLERANCE)
    return ShapeSummary(
        shape=shape,
        best=best.backend if best else None,
        best_tflops=best.tflops if best else None,
        auto_chosen=auto.chosen if auto else None,
        auto_tflops=auto.tflops if auto else None,
        auto_within_tolerance=within,
        auto_chose_best=None if best is None or auto is None else auto.chosen == best.backend,
        paired_auto_ms=paired[0] if paired else None,
        paired_best_ms=paired[1] if paired else None,
    )


def bench_attention(
    *,
    grid: list[BenchShape] | None = None,
    backends: tuple[str, ...] | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    warmup: int = 3,
    repeats: int = 10,
    budget_s: float | None = None,
    progress: Callable[[BenchRecord], None] | None = None,
) -> AttentionBench:
    """Time each backend and ``auto`` on each grid shape.

    Args:
        grid: shapes to run; default ``default_grid(device=device)``.
        backends: names from ``BACKENDS`` (``reference`` is never timed); default all of them.
        device: ``"cuda"`` when available, else ``"cpu"``.
        dtype: input dtype (bf16 by default).
        warmup, repeats: per measurement; the median is reported.
        budget_s: stop starting new measurements after this many seconds; the rest are
            recorded as skipped. ``auto`` and its three preferred backends run first.
        progress: called with each record as it completes.
    Returns:
        An :class:`AttentionBench` with one record per (shape, backend) and one summary per shape.

    Example::

        report = bench_attention(grid=default_grid(quick=True, device="cpu"), device="cpu")
        json.dump(report.to_json(), open("bench.json", "w"))
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    grid = grid if grid is not None else default_grid(device=device)
    names = [name for name in BACKENDS if name != "reference"] if backends is None else list(backends)
    for name in names:
        check_arg(name in BACKENDS and name != "reference", "backends", f"names from {sorted(set(BACKENDS) - {'reference'})}", name)
    # Backends in auto's own preference order. auto and the top three run shape by shape, close
    # in time (so the 2% comparison sees the same clocks); the rest run after, so that when
    # the budget runs out it is the slow fallbacks that get skipped.
    preference = select_backend(grid[0].spec(device, dtype)).candidates if grid else ()
    order = ["auto"] + sorted(names, key=lambda n: preference.index(n) if n in preference else len(preference))
    plan = [(shape, backend) for shape in grid for backend in order[:4]]
    plan += [(shape, backend) for backend in order[4:] for shape in grid]
    report = AttentionBench(
        device=torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        torch=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(sys.argv),
        dtype=str(dtype).removeprefix("torch."),
        flops_convention="fwd 4*B*H*Sq*Skv*D, halved for causal; bwd 2.5x fwd (fwd+bwd 3.5x)",
    )
    start = time.monotonic()
    for shape, backend in plan:
        over_budget = budget_s is not None and time.monotonic() - start > budget_s
        record = _run_one(shape, backend, device, dtype, warmup, repeats, over_budget=over_budget)
        report.records.append(record)
        if progress:
            progress(record)
    report.records.sort(key=lambda r: (grid.index(r.shape), order.index(r.backend)))
    for shape in grid:
        records = [r for r in report.records if r.shape == shape]
        timed = [r for r in records if r.tflops is not None]
        best = max((r for r in timed if r.backend != "auto"), key=lambda r: r.tflops, default=None)
        has_auto = any(r.backend == "auto" for r in timed)
        paired = _paired(shape, best.backend, device, dtype, warmup, repeats) if best is not None and has_auto else None
        report.summaries.append(_summarize(shape, records, paired))
    return report


def _run_one(
    shape: BenchShape, backend: str, device: str, dtype: torch.dtype, warmup: int, repeats: int, *, over_budget: bool
) -> BenchRecord:
    spec = shape.spec(device, dtype)
    reason = "time budget spent" if over_budget else None if backend == "auto" else backend_support(spec)[backend]
    if reason is None:
        try:
            median_ms = _measure(shape, backend, device, dtype, warmup, repeats)
        except torch.cuda.OutOfMemoryError:
            reason = "out of memory"
        except (AttnkitError, RuntimeError) as error:
            # A refusal or a failed compile costs this one measurement, not the whole run.
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
        if reason == "out of memory":  # after the except block, which kept the inputs alive
            torch.cuda.empty_cache()
    # After the run: a kernel refusing at run time changes auto's choice.
    chosen = select_backend(spec).chosen if backend == "auto" else None
    if reason is not None:
        return BenchRecord(shape, backend, skipped=reason, chosen=chosen)
    tflops = spec.flops(backward=shape.backward) / (median_ms * 1e-3) / 1e12
    return BenchRecord(shape, backend, median_ms=median_ms, tflops=tflops, chosen=chosen)


def suggest_rules(report: AttentionBench) -> list[Rule]:
    """Rules for ``attnkit.ops.auto.RULES`` from a run: per (head dim, causal, pass), backends by
    the geometric mean over sequence lengths of their throughput relative to the best.

    Backends that never ran in a group go last, in the current order. Rules come smallest
    head dim first, because ``max_head_dim`` matches every head dim up to it.
    """
    groups: dict[tuple[int, bool, bool], list[BenchShape]] = {}
    for summary in report.summaries:
        shape = summary.shape
        groups.setdefault((shape.head_dim, shape.causal, shape.backward), []).append(shape)
    rules = []
    for (head_dim, causal, backward), shapes in sorted(groups.items()):
        scores: dict[str, list[float]] = {}
        for shape in shapes:
            measured = [r for r in report.records if r.shape == shape and r.tflops is not None and r.backend != "auto"]
            best = max((r.tflops for r in measured), default=None)
            for record in measured:
                scores.setdefault(record.backend, []).append(math.log(record.tflops / best))
        ranked = sorted(scores, key=lambda name: -sum(scores[name]) / len(scores[name]))
        current = select_backend(shapes[0].spec(_device_type(report), parse_dtype(report.dtype))).candidates
        order = tuple(ranked) + tuple(name for name in current if name not in ranked)
        why = f"measured: {report.device}, torch {report.torch}, {report.date[:10]}, {report.dtype}, hd{head_dim}"
        rules.append(Rule(order=order, why=why, device=_device_type(report), causal=causal, requires_grad=backward, max_head_dim=head_dim))
    return rules


def _device_type(report: AttentionBench) -> str:
    return "cpu" if report.device.startswith("cpu") else "cuda"
