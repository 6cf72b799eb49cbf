"""A Triton kernel for the eager FP8 casts: multiply by the scale, saturate and cast in one memory pass.

The torch path (:func:`attnkit.fp8.scaling.quantize`) runs ``x.float()``, the multiply, the clamp and the
cast as separate kernels, each a full pass over the operand; ``torch.compile`` fuses them, eager mode does
not. Here the amax (:func:`~attnkit.fp8.scaling.compute_amax`, one reduction kernel) and the scale math
(:func:`~attnkit.fp8.scaling.scales`, a few kernels on one number per tensor or per row) are the torch
path's own functions, so the scales are the same tensors by construction, and one Triton kernel then
reads the operand once (any strides: the transposed views of the backward too) and writes the
contiguous FP8 data: ``x.float() * scale``, clamped to +-fp8_max (NaN kept), cast with round-to-nearest-
even, as the torch ops do. For a 16-bit operand the same kernel also stores the transposed FP8 operand a
tensorwise backward needs, from the same registers (torch's copy of a transposed FP8 tensor is a slow
byte gather: about 0.3x of the eager Llama block's speed-up on an H200).

Two earlier versions computed the scale in the kernel (float64, power-of-2 by clearing mantissa bits):
on an H200 with torch 2.11's Triton, a NaN constexpr global broke every second specialisation and some
power-of-2 row scales differed from torch's by a factor of 2. Their transposed store from a float32
operand (the weight of an fp32-master ``nn.Linear``) left columns of NaN bytes, while the 16-bit
operands' transposes matched torch byte for byte; float32 operands are therefore transposed by a torch
copy of the FP8 bytes. The GPU tests (tests/fp8/test_triton_cast.py) compare bytes and scales with the
torch path for both input widths.

Importing this module needs ``triton``; :mod:`attnkit.fp8.linear` imports it lazily and only uses it for
CUDA tensors outside ``torch.compile`` (Inductor fuses the torch ops itself, without graph breaks). Under
``TRITON_INTERPRET=1`` the kernel also runs on CPU tensors (slowly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnkit.errors import check_arg
from attnkit.fp8.scaling import Granularity, Quantized, compute_amax, scales

__all__ = ["quantize"]

_FORMATS = (torch.float8_e4m3fn, torch.float8_e5m2)


@triton.jit
def _scaled_cast_kernel(x_ptr, scale_ptr, out_ptr, out_t_ptr, R, C, stride_r, stride_c,
                        FMAX: tl.constexpr, PER_ROW: tl.constexpr, WITH_T: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One (BLOCK_R, BLOCK_C) tile of x (R, C) into out (R, C), contiguous: saturate(x * scale) -> FP8;
    WITH_T also into out_t (C, R), contiguous. ``scale`` is one float32 (tensorwise) or one per row (PER_ROW)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    if PER_ROW:
        scale = tl.load(scale_ptr + rows, mask=rows < R, other=0.0)[:, None]
    else:
        scale = tl.load(scale_ptr)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c, mask=mask, other=0.0)
    y = x.to(tl.float32) * scale
    y = tl.where(y > FMAX, FMAX, tl.where(y < -FMAX, -FMAX, y))  # torch.clamp: a comparison with NaN is False, NaN stays
    q = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], q, mask=mask)
    if WITH_T:
        tl.store(out_t_ptr + cols[None, :].to(tl.int64) * R + rows[:, None], q, mask=mask)


def quantize(x: torch.Tensor, dtype: torch.dtype, granularity: Granularity, *, amax: torch.Tensor | None = None,
             power_of_2: bool = False, with_t: bool = False) -> tuple[Quantized, Quantized | None]:
    """:func:`attnkit.fp8.scaling.quantize` (same bytes, same scales) for tensor and row scales, fused.

    Args:
        x: (outer, inner) floating tensor, any strides (``inner`` is the GEMM's contraction axis).
        dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        granularity: ``Granularity.TENSOR`` or ``Granularity.ROW``.
        amax: the amax to scale from (delayed scaling), shaped like the scale; default: the current amax of ``x``.
        power_of_2: round scales down to powers of two.
        with_t: tensorwise only: also return the transposed operand (inner, outer), contiguous.

    Returns:
        ``(q, q_t)``: ``q`` with contiguous (outer, inner) FP8 data and float32 dequantisation scale (``()``
        or ``(outer, 1)``); ``q_t`` the (inner, outer) transpose sharing ``q.scale``, or None.
    """
    check_arg(x.dim() == 2 and x.is_floating_point(), "x", "a 2-D floating tensor (outer, inner)", x)
    check_arg(dtype in _FORMATS, "dtype", f"one of {_FORMATS}", dtype)
    check_arg(granularity in (Granularity.TENSOR, Granularity.ROW), "granularity", "TENSOR or ROW", granularity,
              "Blockwise scales run on the torch path (attnkit.fp8.scaling.quantize).")
    check_arg(granularity is Granularity.TENSOR or not with_t, "with_t", "False for row scales", with_t)
    current = compute_amax(x, granularity) if amax is None else amax
    scale, inverse = scales(current, dtype, power_of_2=power_of_2)
    outer, inner = x.shape
    data = torch.empty((outer, inner), dtype=dtype, device=x.device)
    store_t = with_t and x.element_size() == 2  # see the module docstring for float32
    data_t = torch.empty((inner, outer), dtype=dtype, device=x.device) if store_t else data
    block_r, block_c = 64, 128
    _scaled_cast_kernel[(triton.cdiv(outer, block_r), triton.cdiv(inner, block_c))](
        x, scale.contiguous(), data, data_t, outer, inner, x.stride(0), x.stride(1),
        FMAX=torch.finfo(dtype).max, PER_ROW=granularity is Granularity.ROW, WITH_T=store_t,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8)
    q = Quantized(data, inverse, granularity)
    if not with_t:
        return q, None
    return q, (Quantized(data_t, inverse, granularity) if store_t else q.t_tensorwise())
