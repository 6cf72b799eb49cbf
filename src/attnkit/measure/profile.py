"""Measured vs predicted on a CUDA GPU: kernels and latency per forward, eager and ``torch.compile``.

Without a GPU the models run on the CPU: latency only (median wall time of eager forwards, no kernel
counts or group times), for comparing with a CPU profile such as ``hardware="this"``.

Kernels are counted with ``torch.profiler`` (CUDA kernel events per forward; memcpy and memset
excluded), and their device time is summed per kernel group (:mod:`attnkit.analyze.groups`);
latency is the median of CUDA-event timed forwards (:func:`attnkit.bench.time_fn`); host time is
the median wall time of a forward that is not synchronised inside. Predictions come from
:func:`attnkit.analyze.analyze` on the same model and inputs, per group too, so an error
can be located (GEMMs, attention, norms, elementwise, host dispatch).
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from attnkit.bench import host_ms, kernel_stats, time_fn
from attnkit.analyze.api import analyze
from attnkit.analyze.groups import measured_group
from attnkit.errors import check_arg
from attnkit.hardware.profiles import HardwareProfile
from attnkit.measure.this_machine import load_hardware

__all__ = ["ProfileRecord", "ProfileResult", "profile_models", "load_measured"]

_MODES = ("eager", "compiled")


@dataclass(frozen=True)
class ProfileRecord:
    """Predicted and measured numbers of one model, batch and mode."""

    model: str
    batch: int
    dtype: str
    mode: str
    predicted_kernels: int | None
    """None if the analysis failed (``note`` says why)."""
    measured_kernels: float | None
    """CUDA kernels per forward; None if skipped or failed (``note`` says why)."""
    predicted_ms: float | None
    measured_ms: float | None
    """Median latency per forward."""
    note: str = ""
    predicted_host_ms: float | None = None
    """Predicted host dispatch time per forward (GPU idle)."""
    measured_host_ms: float | None = None
    """Median host wall time of an unsynchronised forward."""
    predicted_device_ms: float | None = None
    """Predicted sum of kernel times."""
    measured_device_ms: float | None = None
    """Sum of measured kernel durations per forward."""
    predicted_groups_ms: dict[str, float] = field(default_factory=dict)
    """Predicted device time per kernel group (gemm, attention, conv, norm, elementwise, other)."""
    measured_groups_ms: dict[str, float] = field(default_factory=dict)
    """Measured device time per kernel group."""

    @property
    def kernel_error(self) -> float | None:
        """(predicted - measured) / measured kernel count."""
        return _relative(self.predicted_kernels, self.measured_kernels)

    @property
    def latency_error(self) -> float | None:
        """(predicted - measured) / measured latency."""
        return _relative(self.predicted_ms, self.measured_ms)

    def group_errors(self) -> dict[str, float | None]:
        """(predicted - measured) / measured device time per kernel group, host and device total included."""
        pairs = {"host": (self.predicted_host_ms, self.measured_host_ms),
                 "device": (self.predicted_device_ms, self.measured_device_ms)}
        for group in sorted({*self.predicted_groups_ms, *self.measured_groups_ms}):
            pairs[group] = (self.predicted_groups_ms.get(group, 0.0), self.measured_groups_ms.get(group))
        return {name: _relative(predicted, measured) for name, (predicted, measured) in pairs.items()}

    def to_json(self) -> dict:
        return {**asdict(self), "kernel_error": self.kernel_error, "latency_error": self.latency_error,
                "group_errors": self.group_errors()}


def _relative(predicted: float | None, measured: float | None) -> float | None:
    return None if predicted is None or not measured else (predicted - measured) / measured


@dataclass(frozen=True)
class ProfileResult:
    """A profiling session: the device, versions, and one record per model x batch x mode."""

    device: str
    torch: str
    date: str
    hardware: str
    """Profile the predictions used."""
    records: tuple[ProfileRecord, ...]
    command: str = ""
    extra: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"ProfileResult({self.device!r}, records={len(self.records)})"

    def to_json(self) -> dict:
        return {**asdict(self), "records": [r.to_json() for r in self.records]}



def _failure(error: Exception) -> str:
    return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def _measure(record: ProfileRecord, zoo, log: Callable[[str], None]) -> ProfileRecord:
    """Fill in the measured kernels, latency, host time and group times of ``record`` (latency only on a CPU)."""
    model = torch.compile(zoo.model, dynamic=False) if record.mode == "compiled" else zoo.model

    def run():
        with torch.no_grad():
            return model(*zoo.example_inputs, **zoo.example_kwargs)

    if not torch.cuda.is_available():
        try:
            timing = time_fn(run, warmup=2, repeats=10, device="cpu")
        except Exception as error:  # record it, keep going
            return replace(record, note=_join(record.note, _failure(error)))
        log(f"{record.model} batch {record.batch} {record.mode}: {timing.median_ms:.3f} ms on CPU "
            f"(predicted {record.predicted_ms if record.predicted_ms is None else round(record.predicted_ms, 3)})")
        return replace(record, measured_ms=timing.median_ms)
    try:
        kernels, groups = kernel_stats(run, group=measured_group)
        timing = time_fn(run, warmup=5, repeats=20, device="cuda")
        host = host_ms(run, repeats=5)
    except Exception as error:  # e.g. a compile failure: record it, keep going
        log(f"{record.model} batch {record.batch} {record.mode}: {_failure(error)}")
        return replace(record, note=_join(record.note, _failure(error)))
    predicted = "?" if record.predicted_ms is None else f"{record.predicted_ms:.3f}"
    log(f"{record.model} batch {record.batch} {record.mode}: kernels {kernels:.0f} (predicted {record.predicted_kernels}), "
        f"{timing.median_ms:.3f} ms (predicted {predicted}), host {host:.3f} ms")
    return replace(record, measured_kernels=kernels, measured_ms=timing.median_ms, measured_host_ms=host,
                   measured_device_ms=sum(groups.values()), measured_groups_ms=groups)


def _join(*notes: str) -> str:
    return "; ".join(note for note in notes if note)


def _predicted(report, name: str, batch: int, label: str, mode: str) -> ProfileRecord:
    summary = report.mode(mode)
    groups: dict[str, float] = {}
    for kernel in summary.kernels:
        groups[kernel.group] = groups.get(kernel.group, 0.0) + kernel.time_s * 1e3
    return ProfileRecord(name, batch, label, mode, summary.num_kernels, None, summary.predicted_s * 1e3, None,
                         predicted_host_ms=summary.host_s * 1e3, predicted_device_ms=summary.device_s * 1e3,
                         predicted_groups_ms=groups)


def profile_models(
    names: Sequence[str],
    *,
    batches: Sequence[int] = (1, 64),
    dtype: torch.dtype = torch.bfloat16,
    hardware: "str | HardwareProfile" = "h100",
    modes: Sequence[str] = _MODES,
    time_budget_s: float = 450.0,
    log: Callable[[str], None] = print,
) -> ProfileResult:
    """Predict and measure every model x batch x mode on the current CUDA GPU (without one: on the CPU,
    at torch's thread count, latency only; pair it with ``hardware="this"``).

    A model that fails to build, analyse or run gets records whose ``note`` says why; the others go on.

    Args:
        names: zoo names or ``package.module:function``.
        batches: batch sizes.
        dtype: model and analysis dtype.
        hardware: the profile the predictions use: a name, ``"this"`` or a calibrate JSON.
        modes: ``"eager"`` and/or ``"compiled"`` (``torch.compile`` default mode, static shapes).
        time_budget_s: once spent, remaining ``compiled`` runs are skipped (their note says so).
        log: progress lines.
    Returns:
        A :class:`ProfileResult`.
    """
    check_arg(set(modes) <= set(_MODES), "modes", f"a subset of {_MODES}", modes)
    profile = load_hardware(hardware)  # "this" calibrates once, before any model is built
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from attnkit.models import build_model

    start, records = time.perf_counter(), []
    label = str(dtype).removeprefix("torch.")
    for name in names:
        for batch in batches:
            torch._dynamo.reset()
            try:
                zoo = build_model(name, batch_size=batch, dtype=dtype, device=device)
            except Exception as error:  # one broken model must not cost the other measurements
                log(f"{name} batch {batch}: build failed: {error}")
                records += [ProfileRecord(name, batch, label, mode, None, None, None, None, _failure(error))
                            for mode in modes]
                continue
            try:
                report = analyze(zoo.model, zoo.example_inputs, zoo.example_kwargs, hardware=profile, dtype=dtype,
                                 name=name)
                planned = [_predicted(report, name, batch, label, mode) for mode in modes]
            except Exception as error:  # measure anyway: the measurement does not need the prediction
                log(f"{name} batch {batch}: analysis failed: {error}")
                planned = [ProfileRecord(name, batch, label, mode, None, None, None, None,
                                         f"analysis {_failure(error)}") for mode in modes]
            for record in planned:
                if record.mode == "compiled" and time.perf_counter() - start > time_budget_s:
                    records.append(replace(record, note=_join(record.note, "skipped: time budget spent")))
                    continue
                records.append(_measure(record, zoo, log))
            del zoo
            if device == "cuda":
                torch.cuda.empty_cache()
    if device == "cpu":
        from attnkit.measure.calibrate_cpu import cpu_name

        name = f"{cpu_name()} ({torch.get_num_threads()} threads)"
    else:
        name = torch.cuda.get_device_name()
    return ProfileResult(
        device=name, torch=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        hardware=hardware.key if isinstance(hardware, HardwareProfile) else str(hardware),
        records=tuple(records), extra={"python": platform.python_version(), "seconds": round(time.perf_counter() - start, 1)},
    )


def load_measured(path: str | Path, model: str | None = None, batch: int | None = None) -> dict[str, dict]:
    """Measured numbers per mode from a profile JSON, for ``analyze(..., measured=...)``.

    Picks the records of ``model`` and ``batch`` (the first model/batch in the file when None).
    """
    data = json.loads(Path(path).read_text())
    records = [r for r in data.get("records", []) if r.get("measured_kernels") is not None]
    check_arg(bool(records), "measured", "a profile JSON with measured records", str(path))
    model = model if any(r["model"] == model for r in records) else records[0]["model"]
    batch = batch if any(r["batch"] == batch and r["model"] == model for r in records) else records[0]["batch"]
    return {r["mode"]: {"kernels": r["measured_kernels"], "latency_ms": r["measured_ms"], "batch": r["batch"],
                        "device": data.get("device")}
            for r in records if r["model"] == model and r["batch"] == batch}
