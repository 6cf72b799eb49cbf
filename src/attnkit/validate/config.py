"""`ValidateConfig`: what `validate()` checks and how hard, with named presets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

from attnkit.errors import check_arg, fail

__all__ = ["STAGES", "PRESETS", "ValidateConfig", "BackendFn"]

STAGES = ("compatibility", "accuracy", "performance", "compile_amp")
PRESETS = ("quick", "default", "thorough")

BackendFn = Callable[..., object]
"""A backend under test: a callable with the signature of ``attnkit.ops.attention``
(``q, k, v, *, mask, causal, scale, dropout_p, dropout_mask, return_lse``)."""


@dataclass(frozen=True)
class ValidateConfig:
    """Settings of one validation run. Build with ``ValidateConfig.preset("quick")`` or directly."""

    stages: tuple[str, ...] = STAGES
    """Stages to run, a subset of ``STAGES``; skipped stages are listed in the report with the reason."""
    backends: tuple[str, ...] | None = None
    """Names in ``attnkit.ops.BACKENDS`` to test; None = all of them except ``reference``."""
    extra_backends: Mapping[str, BackendFn] = field(default_factory=dict, compare=False)
    """Custom backends to test beside the named ones (your kernel, or a planted fault in tests)."""
    seed: int | None = None
    """Seed of the random accuracy inputs; None = fresh inputs every run (the seed used is reported)."""
    tolerance_factor: float = 2.0
    """k in the pass rule ``error <= k * math_error + floor`` (FlashAttention's tests use 2)."""
    accuracy_max_batch: int = 2
    """Accuracy runs each layer's real heads, sequence lengths and head dims, with at most this batch."""
    model_output: bool = True
    """Also compare the whole model's output with each backend forced against the model in float64."""
    perf_batches: tuple[int, ...] = (8,)
    """Batch sizes of the performance sweep (the model's own shape is always timed)."""
    perf_seqs: tuple[int, ...] = (512, 1024, 2048, 4096)
    """Sequence lengths of the performance sweep (self-attention layers get Sq = Skv = seq)."""
    cpu_sweep: bool = False
    """On CPU only the model's own shapes are timed unless True (CPU timings say little about GPU kernels)."""
    warmup: int = 5
    repeats: int = 30
    time_backward: bool = False
    """Time forward + backward instead of forward only."""
    time_model: bool = True
    """Also time the whole model's forward with each backend forced (the layer sweep always runs)."""
    compile_backends: tuple[str, ...] = ("inductor",)
    """``torch.compile`` backends to try, cheapest first; ``thorough`` climbs the ladder
    ``aot_eager`` (tracing + autograd only) -> ``inductor`` to tell tracing bugs from codegen bugs."""
    compile_on_cpu: bool = False
    """On CPU, compiling a full model takes minutes on a small machine; skipped (with the reason) unless True."""
    amp_dtypes: tuple[str, ...] = ("bfloat16", "float16")
    """Autocast dtypes checked against the float64 model."""

    def __post_init__(self) -> None:
        for stage in self.stages:
            check_arg(stage in STAGES, "stages", f"a subset of {STAGES}", self.stages)
        check_arg(self.tolerance_factor >= 1.0, "tolerance_factor", "a float >= 1 (2 is FlashAttention's rule)", self.tolerance_factor)
        check_arg(self.accuracy_max_batch >= 1, "accuracy_max_batch", "an int >= 1", self.accuracy_max_batch)
        check_arg(all(b >= 1 for b in self.perf_batches), "perf_batches", "ints >= 1", self.perf_batches)
        check_arg(all(s >= 1 for s in self.perf_seqs), "perf_seqs", "ints >= 1", self.perf_seqs)
        check_arg(self.repeats >= 1 and self.warmup >= 0, "repeats/warmup", "repeats >= 1 and warmup >= 0", (self.repeats, self.warmup))
        for name in self.amp_dtypes:
            check_arg(name in ("bfloat16", "float16"), "amp_dtypes", "a subset of ('bfloat16', 'float16')", self.amp_dtypes)
        for name, fn in self.extra_backends.items():
            check_arg(callable(fn), f"extra_backends[{name!r}]", "a callable with attnkit.ops.attention's signature", fn)
            if self.backends is not None and name in self.backends:
                fail("extra_backends", "names that differ from the named backends", name, "Rename the custom backend.")

    @classmethod
    def preset(cls, name: str, **overrides) -> ValidateConfig:
        """A named preset, optionally with fields overridden.

        - ``quick``: compatibility and accuracy at the model's shapes, attention timing at the
          model's shapes only (10 repeats, no whole-model timing), no compile, bf16 autocast only.
        - ``default``: every stage; batch 8 x seq (512, 1024, 2048, 4096) sweep; inductor compile.
          Each new shape costs FlexAttention a compile, so the sweep is kept short.
        - ``thorough``: a wider sweep with forward + backward timing; aot_eager and inductor.
        """
        if name == "quick":
            base = cls(perf_batches=(), perf_seqs=(), warmup=2, repeats=10, time_model=False, compile_backends=(), amp_dtypes=("bfloat16",))
        elif name == "default":
            base = cls()
        elif name == "thorough":
            base = cls(perf_batches=(1, 4, 16), perf_seqs=(256, 512, 1024, 2048, 4096, 8192), time_backward=True, repeats=50, compile_backends=("aot_eager", "inductor"))
        else:
            fail("preset", f"one of {PRESETS}", name)
        return replace(base, **overrides)

    def backend_names(self, available: Mapping[str, object]) -> tuple[str, ...]:
        """The named backends to test: ``backends`` or every available one except ``reference``."""
        if self.backends is None:
            return tuple(name for name in available if name != "reference")
        for name in self.backends:
            check_arg(name in available, "backends", f"names in attnkit.ops.BACKENDS {sorted(available)}", self.backends)
        return self.backends

    def to_json(self) -> dict:
        record = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "extra_backends"}
        record["extra_backends"] = sorted(self.extra_backends)
        return record

