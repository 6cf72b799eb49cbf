"""`OptimizeConfig`: what `optimize()` rewrites, how it checks the result, and what it measures."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from attnkit.errors import check_arg, check_type
from attnkit.fp8.config import Recipe
from attnkit.utils.dtypes import parse_dtype

__all__ = ["OptimizeConfig", "PRESETS", "COMPILE_MODES", "FP8_RECIPES"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
"""``torch.compile`` modes ``compile`` accepts ("default" = ``mode=None``)."""
_HF_MASKS = ("sdpa", "keep")
FP8_RECIPES = tuple(recipe.value for recipe in Recipe)
"""Recipe names ``fp8`` accepts (:meth:`attnkit.fp8.Float8TrainingConfig.from_recipe_name`)."""


@dataclass(frozen=True)
class OptimizeConfig:
    """Options of :func:`attnkit.optimize.optimize`. Presets: ``OptimizeConfig.from_preset(name)``."""

    dtype: torch.dtype | None = None
    """Cast the optimized model to this dtype (None keeps the model's dtype)."""
    backend: str = "auto"
    """``attnkit.ops`` backend for every rewritten attention (``"auto"`` picks per call shape)."""
    fuse_qkv: bool = True
    """Fuse sibling ``nn.Linear`` layers that read the same tensor into one GEMM (Q/K/V of self
    attention, K/V of cross attention; not a gated MLP's gate/up, whose outputs feed only elementwise
    ops), found by tracing the example inputs; state-dict keys unchanged (see
    :mod:`attnkit.optimize.fuse`). Needs example inputs."""
    rewrite_mha: bool = True
    """Rewrite ``torch.nn.MultiheadAttention`` into ``attnkit.nn.MultiHeadAttention``."""
    rewrite_hf: bool = True
    """Switch transformers models to ``attn_implementation="attnkit"`` (their own projections, masks
    and caches; the attention core on ``attnkit.ops``)."""
    patchify_gemm: bool = True
    """Run patchify convolutions (``nn.Conv2d`` with stride == kernel size, no padding, dilation or
    groups: ViT's patch embedding) as a reshape of the image into patches and one GEMM (exact up to
    summation order; same parameters and state-dict keys)."""
    hf_masks: str = "keep"
    """``"keep"``: leave the model's ``attn_implementation`` alone. ``"sdpa"``: switch a model built
    with ``"eager"`` to SDPA-style masks (None or bool instead of a dense float mask per call);
    rows that may see no key at all (queries at padded positions of a causal model) then
    give zeros instead of eager's average of the values, so only use it when those outputs are
    ignored (they are padding)."""
    compile: str | tuple[str, ...] = "none"
    """``torch.compile`` the optimized model: ``"none"`` or one of ``COMPILE_MODES``. With ``select``, a
    tuple of modes: each is a candidate (``("default", "max-autotune")``)."""
    select: bool = False
    """Race the variants on the example inputs and return the fastest that passed the equivalence
    checks: the original, the rewritten model and both compiled with each ``compile`` mode
    (inference; ``rounds`` interleaved rounds of ``warmup`` + ``repeats`` calls, CUDA events on a
    GPU). A variant wins only if faster than the original in every round by >= 2% (median paired
    ratio); otherwise the original (cast to ``dtype``) is returned. The report lists every candidate."""
    inplace: bool = False
    """Rewrite the given model itself instead of a deep copy."""
    check: bool = True
    """Compare outputs (and gradients) with the original on the example inputs."""
    check_training: bool = True
    """Also compare gradients in train mode (dropout probabilities set to 0 for the check)."""
    fp32_rtol: float = 1e-5
    """fp32 outputs pass if ``max|opt - orig| <= fp32_rtol * max|orig|`` (gradients: 10x)."""
    dtype_factor: float = 2.0
    """In the target dtype, ``err(opt vs fp64) <= dtype_factor * err(orig in dtype vs fp64)`` (+ a tiny floor);
    gradients get ``1.5 * dtype_factor`` (the FlashAttention rule: 2x outputs, 3x gradients)."""
    measure: bool = True
    """Time original vs optimized forward on CUDA (skipped on CPU)."""
    warmup: int = 3
    repeats: int = 10
    rounds: int = 5
    """Interleaved timing rounds of ``select`` (each: ``warmup`` + ``repeats`` calls per variant)."""
    seed: int = 0
    fp8: str | None = None
    """Also build an FP8 inference variant with this recipe (one of ``FP8_RECIPES``): the exact optimized
    model with its linears in FP8 where the measured table says FP8 is faster. Approximate, so it never
    counts as the optimized model: ``report.fp8`` gives its accuracy (vs the original in float64), its
    speed next to the exact pick's, and the model (``report.fp8.model``). Needs example inputs and CUDA
    sm89+ (elsewhere the report says why it was not built)."""
    fp8_emulate: bool = False
    """Build the FP8 variant on any device with its GEMMs emulated in float32 (the same quantisation; never
    faster, and every 16-aligned linear is converted, since the speed filter describes real FP8 GEMMs).
    For tests and for accuracy studies on machines without FP8."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", parse_dtype(self.dtype, allow_none=True))
        check_type(self.backend, str, "backend")
        for name in ("fuse_qkv", "rewrite_mha", "rewrite_hf", "patchify_gemm", "select", "inplace", "check", "check_training", "measure", "fp8_emulate"):
            check_type(getattr(self, name), bool, name)
        check_arg(self.hf_masks in _HF_MASKS, "hf_masks", f"one of {_HF_MASKS}", self.hf_masks)
        modes = self.compile if isinstance(self.compile, tuple) else (self.compile,)
        check_arg(
            bool(modes) and all(m in COMPILE_MODES for m in modes) or self.compile == "none",
            "compile", f'"none", one of {COMPILE_MODES}, or (with select=True) a tuple of them', self.compile,
        )  # fmt: skip
        check_arg(not isinstance(self.compile, tuple) or self.select, "compile", "one mode (a tuple of modes needs select=True)", self.compile)
        check_arg(self.fp8 is None or self.fp8 in FP8_RECIPES, "fp8", f"None or a recipe name, one of {list(FP8_RECIPES)}", self.fp8)
        check_arg(not self.fp8_emulate or self.fp8 is not None, "fp8_emulate", "False unless fp8 names a recipe", self.fp8_emulate,
                  "Pass fp8='tensorwise' (or another recipe) together with fp8_emulate=True.")
        check_arg(isinstance(self.rounds, int) and self.rounds >= 1, "rounds", "an int >= 1", self.rounds)
        check_arg(self.fp32_rtol > 0, "fp32_rtol", "a float > 0", self.fp32_rtol)
        check_arg(self.dtype_factor >= 1, "dtype_factor", "a float >= 1", self.dtype_factor)
        check_arg(isinstance(self.warmup, int) and self.warmup >= 0, "warmup", "an int >= 0", self.warmup)
        check_arg(isinstance(self.repeats, int) and self.repeats >= 1, "repeats", "an int >= 1", self.repeats)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "OptimizeConfig":
        """A named preset (see ``PRESETS``) with optional field overrides."""
        check_arg(name in PRESETS, "name", f"one of {sorted(PRESETS)}", name)
        return replace(PRESETS[name], **overrides)

    def describe(self) -> dict:
        """Fields as JSON-friendly values."""
        return {f.name: (str(v).removeprefix("torch.") if isinstance(v := getattr(self, f.name), torch.dtype) else v) for f in fields(self)}


PRESETS: dict[str, OptimizeConfig] = {
    # Rewrite, check, measure; eager.
    "default": OptimizeConfig(),
    # bf16 + torch.compile: the "rewrite+compile" column of benchmarks/optimize/run.py.
    "fast": OptimizeConfig(dtype=torch.bfloat16, compile="default"),
    # bf16; the fastest of original / rewritten, eager / compiled (default mode, and CUDA graphs for
    # launch-bound calls), raced on the example inputs.
    "best": OptimizeConfig(dtype=torch.bfloat16, compile=("default", "reduce-overhead"), select=True),
    # Only rewrite (no copies for checking, no timing): for large models and for scripts.
    "rewrite-only": OptimizeConfig(check=False, measure=False),
}
