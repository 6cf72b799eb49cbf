"""What FP8 training does: the recipe (how scales are chosen), the formats, and the layer filter.

A frozen dataclass with string-valued enums, checked in ``__post_init__``, with named presets
(``Float8TrainingConfig.from_recipe_name("rowwise")``), following torchao's ``Float8LinearConfig``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

import torch

from attnkit.errors import check_arg, check_type

__all__ = ["Recipe", "Float8Format", "Float8TrainingConfig"]


class Recipe(str, Enum):
    """How each GEMM operand's scale is chosen (see README of ``attnkit.fp8``)."""

    TENSORWISE = "tensorwise"
    """One scale per tensor, from the current amax (dynamic). The fastest on H100."""
    ROWWISE = "rowwise"
    """One scale per row of each operand along the contraction axis (dynamic); more accurate."""
    ROWWISE_WITH_GW_HP = "rowwise_with_gw_hp"
    """Rowwise for the output and input-gradient GEMMs; the weight gradient in high precision."""
    BLOCKWISE = "blockwise"
    """DeepSeek-V3: 1x128 blocks for activations and gradients, 128x128 blocks for weights."""
    DELAYED = "delayed"
    """One scale per tensor from the max of an amax history of past steps (TransformerEngine style)."""


class Float8Format(str, Enum):
    """The FP8 encodings: E4M3 (more precision, max 448) and E5M2 (more range, max 57344)."""

    E4M3 = "e4m3"
    E5M2 = "e5m2"

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype (``float8_e4m3fn`` / ``float8_e5m2``)."""
        return torch.float8_e4m3fn if self is Float8Format.E4M3 else torch.float8_e5m2


@dataclass(frozen=True)
class Float8TrainingConfig:
    """Configuration of :func:`attnkit.fp8.convert_to_float8_training`.

    Example:
        >>> Float8TrainingConfig.from_recipe_name("rowwise", auto_filter=True).recipe.value
        'rowwise'
    """

    recipe: Recipe = Recipe.TENSORWISE
    """Scaling recipe; a string is accepted and converted."""
    forward_format: Float8Format = Float8Format.E4M3
    """Encoding of the input and weight operands."""
    grad_format: Float8Format = Float8Format.E5M2
    """Encoding of the output-gradient operand (both backward GEMMs)."""
    amax_history_len: int = 16
    """Steps of amax kept per operand (``delayed`` only); the scale uses the history's max."""
    power_of_2_scales: bool = False
    """Round every scale down to a power of two, so scaling itself adds no rounding error."""
    fast_accum_forward: bool = True
    """Hopper fast (lower-precision) accumulation for the forward GEMM only, as torchao does."""
    emulate: bool = False
    """Run the GEMMs as fp32 matmuls of the dequantised FP8 operands (same quantisation, any device)."""
    auto_filter: bool = False
    """Keep a layer in high precision where the measured speed table says FP8 is not faster."""
    auto_filter_tokens: int = 16384
    """Tokens per step (GEMM M) the filter assumes when it looks a layer's shape up."""
    auto_filter_min_speedup: float = 1.05
    """Measured fwd+bwd speed-up a layer's shape needs before the filter converts it."""
    enable_fsdp_float8_all_gather: bool = False
    """Under FSDP2 (``fully_shard``), all-gather the weights in FP8 with one global scale per weight
    instead of in high precision (tensorwise only; see :mod:`attnkit.fp8.fsdp`)."""

    def __post_init__(self) -> None:
        for name, enum in (("recipe", Recipe), ("forward_format", Float8Format), ("grad_format", Float8Format)):
            value = getattr(self, name)
            choices = [e.value for e in enum]
            check_arg(isinstance(value, (str, enum)) and str(getattr(value, "value", value)) in choices,
                      name, f"one of {choices}", value)
            object.__setattr__(self, name, enum(value))
        check_type(self.amax_history_len, int, "amax_history_len")
        check_arg(self.amax_history_len >= 1, "amax_history_len", "an int >= 1", self.amax_history_len)
        check_arg(self.recipe is Recipe.DELAYED or self.amax_history_len == 16, "amax_history_len",
                  "the default (16) unless recipe='delayed'", self.amax_history_len,
                  "Only the delayed recipe keeps an amax history; drop the argument or use recipe='delayed'.")
        check_arg(not (self.recipe is Recipe.BLOCKWISE and self.power_of_2_scales), "power_of_2_scales",
                  "False with recipe='blockwise'", self.power_of_2_scales,
                  "Block scales are already local; power-of-2 rounding is a rowwise/tensorwise option.")
        check_arg(self.recipe is not Recipe.BLOCKWISE or self.emulate
                  or (self.forward_format, self.grad_format) == (Float8Format.E4M3, Float8Format.E4M3),
                  "grad_format", "'e4m3' with recipe='blockwise'", self.grad_format.value,
                  "cuBLAS blockwise GEMMs take E4M3 operands only (E5M2 is refused on H100/H200, torch 2.11); "
                  "use Float8TrainingConfig.from_recipe_name('blockwise') or emulate=True.")
        check_arg(self.auto_filter_tokens >= 16, "auto_filter_tokens", "an int >= 16", self.auto_filter_tokens)
        check_arg(self.auto_filter_min_speedup > 0, "auto_filter_min_speedup", "a positive float",
                  self.auto_filter_min_speedup)
        check_arg(not self.enable_fsdp_float8_all_gather or self.recipe is Recipe.TENSORWISE,
                  "enable_fsdp_float8_all_gather", "False unless recipe='tensorwise'",
                  self.enable_fsdp_float8_all_gather,
                  f"FP8 all-gather casts each weight with one global scale, which only the tensorwise recipe "
                  f"uses (got recipe={self.recipe.value!r}); use recipe='tensorwise' or drop the flag.")
        check_arg(not (self.auto_filter and self.emulate), "auto_filter", "False with emulate=True",
                  self.auto_filter, "Emulated FP8 is never faster; the speed table only describes real FP8 GEMMs.")

    @property
    def block_size(self) -> int:
        """Alignment every GEMM dimension must meet: 128 for blockwise, 16 otherwise."""
        return 128 if self.recipe is Recipe.BLOCKWISE else 16

    @classmethod
    def from_recipe_name(cls, name: str, **overrides) -> "Float8TrainingConfig":
        """A named preset: the recipe's recommended settings, then ``overrides`` on top.

        ``tensorwise`` / ``delayed``: E4M3 forward, E5M2 gradients. ``rowwise`` and
        ``rowwise_with_gw_hp``: E4M3 everywhere with power-of-2 scales (per-row scales give the range
        that E5M2 would otherwise buy; torchao's choice). ``blockwise``: E4M3 everywhere (DeepSeek-V3).
        """
        presets = {
            "tensorwise": {},
            "delayed": {"recipe": Recipe.DELAYED},
            "rowwise": {"recipe": Recipe.ROWWISE, "grad_format": Float8Format.E4M3, "power_of_2_scales": True},
            "rowwise_with_gw_hp": {"recipe": Recipe.ROWWISE_WITH_GW_HP, "grad_format": Float8Format.E4M3,
                                   "power_of_2_scales": True},
            "blockwise": {"recipe": Recipe.BLOCKWISE, "grad_format": Float8Format.E4M3},
        }
        check_arg(name in presets, "name", f"one of {sorted(presets)}", name)
        return cls(**{**presets[name], **overrides})

    def replace(self, **changes) -> "Float8TrainingConfig":
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)
