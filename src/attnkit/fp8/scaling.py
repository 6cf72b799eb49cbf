"""Amax -> scale -> saturating FP8 cast, for every scale granularity, and the delayed-scaling history.

Conventions (torchao's): ``scale = fp8_max / amax`` multiplies the high-precision value into FP8 range;
what a quantised operand stores is the *dequantisation* scale ``1 / scale`` (what ``torch._scaled_mm``
takes). Scale math runs in float64 with an eps, so an all-zero row or block gets a huge but finite
scale and quantises to exact zeros, never NaN. A non-finite amax (an inf or NaN in the operand)
makes the dequantisation scale NaN, so the GEMM output is non-finite and the step helper skips the
step: overflow is propagated, never hidden by the saturating cast.

Every operand is given *outer-major*: shape ``(outer, inner)`` with ``inner`` the GEMM's contraction
axis (pass a ``.t()`` view where needed); the FP8 data comes back contiguous in that shape, which is
the row-major A / column-major B layout ``_scaled_mm`` requires.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

import torch

__all__ = ["EPS", "Granularity", "Quantized", "amax_to_scale", "compute_amax", "quantize", "dequantize",
           "update_amax_history", "sqnr"]

EPS = 1e-12
"""Smallest amax a scale is computed from (all-zero operands quantise to zeros with a finite scale)."""

BLOCK = 128
"""Block edge of the blockwise recipe (DeepSeek-V3)."""


class Granularity(str, Enum):
    """Shape of the scale of an outer-major ``(outer, inner)`` operand."""

    TENSOR = "tensor"
    """``()``: one scale."""
    ROW = "row"
    """``(outer, 1)``: one scale per row, over the contraction axis."""
    BLOCK_1X128 = "block1x128"
    """``(outer, inner / 128)``: one scale per 128 contiguous contraction elements."""
    BLOCK_128X128 = "block128x128"
    """``(outer / 128, inner / 128)``: one scale per 128x128 tile."""


class Quantized(NamedTuple):
    """An FP8 operand: ``data`` (outer, inner) contiguous FP8, ``scale`` float32 dequantisation scale."""

    data: torch.Tensor
    scale: torch.Tensor
    granularity: Granularity

    def t_tensorwise(self) -> "Quantized":
        """The transposed operand (``(inner, outer)``, contiguous): valid for one scale per tensor only."""
        assert self.granularity is Granularity.TENSOR
        return Quantized(self.data.t().contiguous(), self.scale, self.granularity)


def compute_amax(x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """Max |x| of an outer-major ``(outer, inner)`` tensor per scale cell, float32, shape of the scale.

    One reduction kernel in eager mode (the inf-norm, NaN-propagating like ``amax``), no ``abs`` temporary.
    """
    if granularity is Granularity.TENSOR:
        view, dims, keep = x, None, False
    elif granularity is Granularity.ROW:
        view, dims, keep = x, 1, True
    elif granularity is Granularity.BLOCK_1X128:
        view, dims, keep = x.unflatten(1, (-1, BLOCK)), 2, False
    else:
        view, dims, keep = x.unflatten(1, (-1, BLOCK)).unflatten(0, (-1, BLOCK)), (1, 3), False
    return torch.linalg.vector_norm(view, float("inf"), dim=dims, keepdim=keep).float()


def amax_to_scale(amax: torch.Tensor, dtype: torch.dtype, *, power_of_2: bool = False) -> torch.Tensor:
    """``fp8_max / max(amax, EPS)`` computed in float64, returned as float32 (finite for amax == 0).

    A non-finite amax gives a non-finite scale (the caller's policy decides what to do with it).
    """
    scale = torch.finfo(dtype).max / amax.double().clamp(min=EPS)
    if power_of_2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return scale.float()


def _times(x: torch.Tensor, scale: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """``x * scale`` with the scale broadcast over its cells; x (outer, inner) float32."""
    if granularity in (Granularity.TENSOR, Granularity.ROW):
        return x * scale
    if granularity is Granularity.BLOCK_1X128:
        return (x.unflatten(1, (-1, BLOCK)) * scale.unsqueeze(-1)).flatten(1)
    tiles = x.unflatten(1, (-1, BLOCK)).unflatten(0, (-1, BLOCK))  # (outer/128, 128, inner/128, 128)
    return (tiles * scale[:, None, :, None]).flatten(2, 3).flatten(0, 1)


def quantize(x: torch.Tensor, dtype: torch.dtype, granularity: Granularity, *,
             amax: torch.Tensor | None = None, power_of_2: bool = False) -> Quantized:
    """Scale, saturate and cast an outer-major ``(outer, inner)`` tensor to FP8.

    Args:
        x: (outer, inner) high-precision tensor (any strides; ``inner`` is contracted by the GEMM).
        dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        granularity: scale shape (:class:`Granularity`); blockwise needs dims divisible by 128.
        amax: the amax to scale from (delayed scaling); default: ``compute_amax(x, granularity)``.
        power_of_2: round scales down to powers of two.

    Returns:
        :class:`Quantized` with contiguous (outer, inner) FP8 data and the float32 dequantisation scale.
        Values beyond the FP8 range saturate to +-max; NaN stays NaN; a non-finite amax sets the scale NaN.
    """
    current = compute_amax(x, granularity) if amax is None else amax
    scale, inverse = scales(current, dtype, power_of_2=power_of_2)
    fmax = torch.finfo(dtype).max
    data = _times(x.float(), scale, granularity).clamp(-fmax, fmax).to(dtype).contiguous()
    return Quantized(data, inverse, granularity)


def scales(amax: torch.Tensor, dtype: torch.dtype, *, power_of_2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, inverse)`` float32 for an amax of any shape: what the data is multiplied by before the cast,
    and the dequantisation scale (its reciprocal; NaN where the amax is not finite)."""
    scale = amax_to_scale(amax, dtype, power_of_2=power_of_2)
    return scale, torch.where(torch.isfinite(amax), scale.reciprocal(), torch.full_like(scale, float("nan")))


def dequantize(q: Quantized) -> torch.Tensor:
    """The float32 (outer, inner) values an FP8 operand stands for: ``data * scale`` per cell."""
    return _times(q.data.float(), q.scale, q.granularity)


def update_amax_history(history: torch.Tensor, amax: torch.Tensor) -> None:
    """Push ``amax`` (a 0-d tensor) into ``history`` (L,) in place, newest first; a non-finite amax is dropped."""
    pushed = torch.cat([amax.reshape(1).to(history.dtype), history[:-1]])
    history.copy_(torch.where(torch.isfinite(amax), pushed, history))


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio in dB: ``20 log10(|ref| / |ref - approx|)`` in float64."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).norm()
    return float(20 * torch.log10(ref.norm() / noise.clamp(min=1e-300)))
