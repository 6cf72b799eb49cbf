"""The one FP8 GEMM: ``a @ b.T`` of two outer-major quantised operands, on ``torch._scaled_mm``.

``a`` is (M, K), ``b`` is (N, K), both contiguous FP8 (:func:`attnkit.fp8.scaling.quantize`), so ``a`` is
the row-major A and ``b.t()`` the column-major B that ``_scaled_mm`` requires. Tensorwise and rowwise
scales go to ``torch._scaled_mm``; blockwise (1x128 / 128x128) scales to ``torch._scaled_mm_v2``
with explicit scaling types and the scale layouts cuBLAS asks for (outer-dim-major 1x128 scales,
128x128 scales padded to a multiple of 4 blocks along K). ``emulate=True`` multiplies the dequantised
operands in float32 instead: the same quantisation, the same accumulation precision, the same roundings
of the result and bias, any device.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from attnkit.fp8.scaling import Granularity, Quantized, dequantize

__all__ = ["scaled_gemm", "native_support", "native_blockwise_support"]


def scaled_gemm(a: Quantized, b: Quantized, out_dtype: torch.dtype, *, bias: torch.Tensor | None = None,
                fast_accum: bool = False, emulate: bool = False) -> torch.Tensor:
    """``(a.data * a.scale) @ (b.data * b.scale).T (+ bias)`` in ``out_dtype``.

    Args:
        a: (M, K) quantised operand (tensor, row or 1x128 granularity).
        b: (N, K) quantised operand (matching granularity; 128x128 allowed with a 1x128 ``a``).
        out_dtype: result dtype (bfloat16, float16 or float32).
        bias: optional (N,); fused into ``_scaled_mm`` (added in float32, one rounding) when it has
            ``out_dtype`` (tensor/row scales, low-precision output), else added after, in ``out_dtype``.
        fast_accum: Hopper fast accumulation (ignored when emulating and for blockwise scales).
        emulate: float32 matmul of the dequantised operands instead of an FP8 GEMM.

    Returns:
        (M, N) tensor of ``out_dtype``.
    """
    native_bias = (bias is not None and a.granularity in (Granularity.TENSOR, Granularity.ROW)
                   and out_dtype != torch.float32 and bias.dtype == out_dtype)
    if emulate:
        out = dequantize(a) @ dequantize(b).t()
        if native_bias:  # _scaled_mm adds the bias in float32, then rounds once
            return (out + bias.float()).to(out_dtype)
        # the real path rounds the product to out_dtype, then adds the bias rounded to out_dtype (an fp32
        # master bias under bf16 activations): round the same way, or the two paths differ by 1 ulp
        out = out.to(out_dtype)
        return out if bias is None else out + bias.to(out_dtype)
    if a.granularity in (Granularity.TENSOR, Granularity.ROW):
        out = torch._scaled_mm(a.data, b.data.t(), scale_a=a.scale, scale_b=b.scale.t(),
                               bias=bias if native_bias else None, out_dtype=out_dtype, use_fast_accum=fast_accum)
        return out if bias is None or native_bias else out + bias.to(out_dtype)
    # cuBLAS (torch 2.11, H100/H200) runs blockwise only with E4M3 operands and without fast accumulation
    out = _blockwise_mm(a.data, b.data.t(), _block_scale(a), _scaling_type(a.granularity),
                        _block_scale(b), _scaling_type(b.granularity), out_dtype)
    return out if bias is None else out + bias.to(out_dtype)


# A custom op around ``torch._scaled_mm_v2``: dynamo cannot trace that builtin (torch 2.11: "does not know
# how to trace the builtin _scaled_mm_v2", a graph break) nor F.scaled_mm's enum handling; an opaque op
# with a shape-only fake keeps a compiled Float8Linear one graph.
@torch.library.custom_op("attnkit::fp8_blockwise_mm", mutates_args=())
def _blockwise_mm(a: torch.Tensor, b_t: torch.Tensor, scale_a: torch.Tensor, type_a: int,
                  scale_b: torch.Tensor, type_b: int, out_dtype: torch.dtype) -> torch.Tensor:
    return torch._scaled_mm_v2(a, b_t, [scale_a], [type_a], [], [scale_b], [type_b], [], None, out_dtype, [], False)


@_blockwise_mm.register_fake
def _blockwise_mm_shape(a, b_t, scale_a, type_a, scale_b, type_b, out_dtype):
    return a.new_empty((a.shape[0], b_t.shape[1]), dtype=out_dtype)


def _scaling_type(granularity: Granularity) -> int:
    """``torch.nn.functional.ScalingType`` value of a block granularity."""
    name = {Granularity.BLOCK_1X128: "BlockWise1x128", Granularity.BLOCK_128X128: "BlockWise128x128"}[granularity]
    return getattr(F.ScalingType, name).value


def _block_scale(q: Quantized) -> torch.Tensor:
    """cuBLAS layouts: 1x128 scales (outer, K/128) outer-dim-major; 128x128 scales (L4, outer/128), K-major."""
    if q.granularity is Granularity.BLOCK_1X128:
        return q.scale.t().contiguous().t()
    pad = -q.scale.shape[1] % 4
    return F.pad(q.scale, (0, pad), value=1.0).t()


_PROBED = {  # first operand's scales -> (what the probe is called in messages, the second operand's scales)
    Granularity.ROW: ("rowwise", Granularity.ROW),
    Granularity.BLOCK_1X128: ("blockwise", Granularity.BLOCK_128X128),
}


@functools.lru_cache(maxsize=None)
def native_support(device_type: str, granularity: Granularity) -> str | None:
    """None if this device runs FP8 GEMMs with ``granularity`` scales (``ROW`` or ``BLOCK_1X128``) natively,
    else the reason (then emulate). Tensorwise needs no probe; rowwise does where torch's CPU
    ``_scaled_mm`` takes per-tensor scales only (torch 2.11: an internal assert), blockwise everywhere."""
    name, other = _PROBED[granularity]
    if granularity is Granularity.BLOCK_1X128 and not hasattr(torch, "_scaled_mm_v2"):
        return f"torch {torch.__version__} has no torch._scaled_mm_v2 (blockwise scaling types)"
    from attnkit.fp8.scaling import quantize

    x = torch.randn(128, 256, device=device_type)
    a = quantize(x, torch.float8_e4m3fn, granularity)
    b = quantize(x, torch.float8_e4m3fn, other)
    try:
        got = scaled_gemm(a, b, torch.float32)
    except (RuntimeError, NotImplementedError, ValueError) as err:
        return f"{device_type}: {str(err).splitlines()[0][:200]}"
    want = scaled_gemm(a, b, torch.float32, emulate=True)
    if not torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max())):
        return f"{device_type}: {name} _scaled_mm ran but disagreed with the emulation (layout mismatch)"
    return None


def native_blockwise_support(device_type: str) -> str | None:
    """None if this device runs blockwise FP8 GEMMs natively, else the reason (then emulate)."""
    return native_support(device_type, Granularity.BLOCK_1X128)


_MIN_CAPABILITY = (8, 9)
"""FP8 tensor cores: Ada (sm89) and Hopper (sm90) onwards."""


def fp8_unavailable(device: torch.device, recipe: str) -> str | None:
    """Why FP8 GEMMs of ``recipe`` cannot run natively on ``device`` (None: they can)."""
    if device.type != "cuda":
        return f"FP8 GEMMs need a CUDA GPU with compute capability >= 8.9; the model is on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < _MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"{name} is sm{capability[0]}{capability[1]}: no FP8 tensor cores (needs sm89+)"
    if recipe == "blockwise":
        return native_blockwise_support(device.type)
    if recipe.startswith("rowwise"):
        return native_support(device.type, Granularity.ROW)
    return None
