"""``Float8Linear``: an ``nn.Linear`` whose forward and both backward GEMMs run in FP8.

The three GEMMs of a linear layer ``y = x W^T + b`` with x (M, K), W (N, K), dy (M, N), each written as
``a @ b.T`` of outer-major operands (see :mod:`attnkit.fp8.gemm`):

======== ============== ================= =====================================
GEMM      a (outer, K)   b (outer, K)      scales per recipe
======== ============== ================= =====================================
output    x (M, K)       W (N, K)          tensor | row | 1x128 x 128x128
grad_in   dy (M, N)      W^T (K, N)        tensor | row | 1x128 x 128x128
grad_w    dy^T (N, M)    x^T (K, M)        tensor | row (hp for _gw_hp) | 1x128 x 1x128
======== ============== ================= =====================================

Tensorwise and delayed quantise each tensor once, writing the transposed FP8 copy the other GEMM needs
in the same pass, and save the FP8 transposes of x and W for backward; rowwise and blockwise re-quantise
along the other axis. In eager mode on CUDA, tensor and row scales run on the fused Triton casts of
:mod:`attnkit.fp8.triton_cast` (same bytes as the torch ops); under ``torch.compile`` the torch ops run and
Inductor fuses them.

Under FSDP2 with ``enable_fsdp_float8_all_gather`` (:mod:`attnkit.fp8.fsdp`) the weight arrives already cast
(a :class:`~attnkit.fp8.fsdp.Float8AllGatheredWeight`): the forward uses its FP8 data and scale as is and
writes only the transpose for grad_x; grad_w is a plain high-precision tensor for FSDP's reduce-scatter.

Overflow policy: an operand whose amax is inf/NaN is counted in ``fp8_overflow_counts`` (x, weight,
grad_output) and gets a NaN scale, so the layer's output (or gradient) is non-finite and the step helper
skips the step; delayed scaling never records a non-finite amax in its history.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.errors import UnsupportedError, check_type
from attnkit.fp8.config import Float8TrainingConfig, Recipe
from attnkit.fp8.fsdp import Float8AllGatheredWeight, WeightWithFloat8AllGather
from attnkit.fp8.gemm import native_support, scaled_gemm
from attnkit.fp8.scaling import Granularity, Quantized, compute_amax, quantize, update_amax_history

__all__ = ["Float8Linear"]

_X, _W, _G = 0, 1, 2  # operand roles: rows of the amax history and the overflow counters

_FORWARD_GRANULARITY = {
    Recipe.TENSORWISE: (Granularity.TENSOR, Granularity.TENSOR),
    Recipe.DELAYED: (Granularity.TENSOR, Granularity.TENSOR),
    Recipe.ROWWISE: (Granularity.ROW, Granularity.ROW),
    Recipe.ROWWISE_WITH_GW_HP: (Granularity.ROW, Granularity.ROW),
    Recipe.BLOCKWISE: (Granularity.BLOCK_1X128, Granularity.BLOCK_128X128),
}


@functools.cache
def _triton_cast_module() -> ModuleType | None:
    """:mod:`attnkit.fp8.triton_cast`, or None where triton does not import."""
    try:
        from attnkit.fp8 import triton_cast
    except ImportError:
        return None
    return triton_cast


def _fused_casts(t: torch.Tensor, granularity: Granularity) -> ModuleType | None:
    """The Triton casts where they apply: eager (Inductor fuses the torch ops itself), CUDA, tensor/row scales."""
    if torch.compiler.is_compiling() or not t.is_cuda or granularity not in (Granularity.TENSOR, Granularity.ROW):
        return None
    return _triton_cast_module()


def _quantize(t: torch.Tensor, dtype: torch.dtype, granularity: Granularity, config: Float8TrainingConfig,
              role: int, history: torch.Tensor | None, counts: torch.Tensor | None,
              with_t: bool = False) -> tuple[Quantized, Quantized | None]:
    """Quantise an outer-major operand (and, ``with_t``, tensorwise only, its transpose), applying delayed
    scaling and counting a non-finite amax."""
    amax = None
    if history is not None:
        current = compute_amax(t, granularity)
        past = history[role].amax()
        amax = torch.where(past > 0, past, current)  # the first step bootstraps from the current amax
        amax = torch.where(torch.isfinite(current), amax, current)  # keep overflow visible (NaN scale)
        update_amax_history(history[role], current)
    fused = _fused_casts(t, granularity)
    if fused is not None:
        q, q_t = fused.quantize(t, dtype, granularity, amax=amax, power_of_2=config.power_of_2_scales, with_t=with_t)
    else:
        q = quantize(t, dtype, granularity, amax=amax, power_of_2=config.power_of_2_scales)
        q_t = q.t_tensorwise() if with_t else None
    if counts is not None:  # the dequantisation scale is NaN exactly where the amax used is not finite
        counts[role] += q.scale.isnan().any()
    return q, q_t


class _Float8Matmul(torch.autograd.Function):
    """x (M, K) @ W (N, K)^T + b with all three GEMMs on FP8 operands; only the needed gradients are computed,
    and only the operands those need are cast (a frozen weight, an input without grad, inference)."""

    @staticmethod
    def forward(ctx, x, weight, bias, config, history, counts, grad_enabled):
        need_x, need_w = (grad_enabled and need for need in ctx.needs_input_grad[:2])
        fwd = config.forward_format.dtype
        gx, gw = _FORWARD_GRANULARITY[config.recipe]
        tensorwise = gx is Granularity.TENSOR
        xq, xq_t = _quantize(x, fwd, gx, config, _X, history, counts, with_t=tensorwise and need_w)
        if isinstance(weight, Float8AllGatheredWeight):  # FSDP2 gathered it already cast (attnkit.fp8.fsdp)
            wq = weight.quantized()
            wq_t = wq.t_tensorwise() if need_x else None
            if counts is not None:
                counts[_W] += wq.scale.isnan().any()
        else:
            weight = weight._tensor if isinstance(weight, WeightWithFloat8AllGather) else weight
            wq, wq_t = _quantize(weight, fwd, gw, config, _W, history, counts, with_t=tensorwise and need_x)
        out = scaled_gemm(xq, wq, x.dtype, bias=bias, fast_accum=config.fast_accum_forward, emulate=config.emulate)
        ctx.config, ctx.history, ctx.counts = config, history, counts
        ctx.has_bias, ctx.dtypes = bias is not None, (x.dtype, weight.dtype)
        if tensorwise:  # backward reads only the FP8 transposes (half the saved bytes of bf16)
            ctx.save_for_backward(None if xq_t is None else xq_t.data, xq.scale, None if wq_t is None else wq_t.data,
                                  wq.scale)
        else:
            ctx.save_for_backward(x if need_w else None, weight if need_x else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        config, history, counts = ctx.config, ctx.history, ctx.counts
        fwd, bwd, emulate = config.forward_format.dtype, config.grad_format.dtype, config.emulate
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_dtype, w_dtype = ctx.dtypes
        recipe = config.recipe
        grad_x = grad_w = None
        if recipe in (Recipe.TENSORWISE, Recipe.DELAYED):
            x_t, x_scale, w_t, w_scale = ctx.saved_tensors
            gq, gq_t = _quantize(grad_out, bwd, Granularity.TENSOR, config, _G, history, counts, with_t=need_w)
            if need_x:  # dy (M, N) @ (W^T (K, N))^T
                grad_x = scaled_gemm(gq, Quantized(w_t, w_scale, Granularity.TENSOR), x_dtype, emulate=emulate)
            if need_w:  # dy^T (N, M) @ (x^T (K, M))^T
                grad_w = scaled_gemm(gq_t, Quantized(x_t, x_scale, Granularity.TENSOR), w_dtype, emulate=emulate)
        else:
            x, weight = ctx.saved_tensors
            block = recipe is Recipe.BLOCKWISE
            g_gran = Granularity.BLOCK_1X128 if block else Granularity.ROW
            w_gran = Granularity.BLOCK_128X128 if block else Granularity.ROW
            g_counts = counts  # grad_output's overflow is counted by its first cast
            if need_x:
                gq, _ = _quantize(grad_out, bwd, g_gran, config, _G, None, g_counts)
                wq, _ = _quantize(weight.t(), fwd, w_gran, config, _W, None, None)
                grad_x = scaled_gemm(gq, wq, x_dtype, emulate=emulate)
                g_counts = None
            if need_w and recipe is Recipe.ROWWISE_WITH_GW_HP:
                grad_w = (grad_out.t() @ x.to(grad_out.dtype)).to(w_dtype)
            elif need_w:
                gtq, _ = _quantize(grad_out.t(), bwd, g_gran, config, _G, None, g_counts)
                xtq, _ = _quantize(x.t(), fwd, g_gran, config, _X, None, None)
                grad_w = scaled_gemm(gtq, xtq, w_dtype, emulate=emulate)
        grad_b = grad_out.sum(0).to(w_dtype) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b, None, None, None, None


_PROBED_SCALES = {  # recipes whose scales not every device's _scaled_mm takes: probed once per device type
    Recipe.ROWWISE: Granularity.ROW,
    Recipe.ROWWISE_WITH_GW_HP: Granularity.ROW,
    Recipe.BLOCKWISE: Granularity.BLOCK_1X128,
}


def _init_float8_state(module: nn.Module, config: Float8TrainingConfig, device: torch.device) -> None:
    """Check ``module``'s ``in_features``/``out_features`` against ``config`` and register the FP8 buffers."""
    check_type(config, Float8TrainingConfig, "config")
    block = config.block_size
    if module.in_features % block or module.out_features % block:
        raise UnsupportedError(
            f"{type(module).__name__}({module.in_features}, {module.out_features}): recipe {config.recipe.value!r} needs "
            f"in_features and out_features divisible by {block}; keep this layer in high precision "
            "(convert_to_float8_training's filter does so automatically).")
    probed = _PROBED_SCALES.get(config.recipe)
    if probed is not None and not config.emulate and device.type != "meta":
        reason = native_support(device.type, probed)
        if reason is not None:
            raise UnsupportedError(f"{config.recipe.value} FP8 GEMMs do not run natively here ({reason}); "
                                   "pass emulate=True in the config to emulate them (not fast).")
    module.config = config
    module.register_buffer("fp8_overflow_counts", torch.zeros(3, dtype=torch.int64, device=device), persistent=False)
    history = None
    if config.recipe is Recipe.DELAYED:
        history = torch.zeros(3, config.amax_history_len, dtype=torch.float32, device=device)
    module.register_buffer("fp8_amax_history", history)


def _float8_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ weight (out, in)^T + bias in FP8 under ``module``'s config and buffers, in x's dtype
    (the autocast dtype under autocast); token counts not a multiple of the block size run ``F.linear``."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        x = x.to(torch.get_autocast_dtype(device))
    x2d = x.reshape(-1, weight.shape[1])
    if x2d.shape[0] % module.config.block_size:
        if isinstance(weight, Float8AllGatheredWeight):
            raise UnsupportedError(
                f"{x2d.shape[0]} tokens: FP8 GEMMs need a multiple of {module.config.block_size}, and the "
                "high-precision fallback has no high-precision weight under enable_fsdp_float8_all_gather; pad the "
                "batch, or keep this layer out of FP8 (module_filter_fn).")
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    with torch.autocast(device, enabled=False):  # the FP8 math picks its own dtypes
        out = _Float8Matmul.apply(x2d, weight, bias, module.config, module.fp8_amax_history, module.fp8_overflow_counts,
                                  torch.is_grad_enabled())
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Float8Linear(nn.Linear):
    """``nn.Linear`` training in FP8 (``torch._scaled_mm``) under a :class:`Float8TrainingConfig`.

    Same parameters and state_dict keys as ``nn.Linear`` (plus ``fp8_amax_history`` (3, L) for the
    delayed recipe). Inputs whose token count M is not a multiple of ``config.block_size`` run the
    plain high-precision ``F.linear`` (``_scaled_mm`` needs every dimension aligned).

    Buffers:
        fp8_overflow_counts: (3,) int64, non-persistent: forward/backward calls whose x, weight or
            grad_output amax was inf/NaN.
        fp8_amax_history: (3, L) float32, delayed only: amax of x, weight, grad_output, newest first.

    Example:
        >>> layer = Float8Linear.from_float(nn.Linear(64, 32), Float8TrainingConfig(emulate=True))
        >>> layer(torch.randn(16, 64)).shape
        torch.Size([16, 32])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 config: Float8TrainingConfig | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        _init_float8_state(self, config or Float8TrainingConfig(), self.weight.device)

    @classmethod
    def from_float(cls, linear: nn.Linear, config: Float8TrainingConfig | None = None) -> "Float8Linear":
        """A ``Float8Linear`` sharing ``linear``'s parameters (the same tensors, no copy)."""
        check_type(linear, nn.Linear, "linear")
        with torch.device("meta"):
            new = cls.__new__(cls)
            nn.Linear.__init__(new, linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight, new.bias = linear.weight, linear.bias
        _init_float8_state(new, config or Float8TrainingConfig(), linear.weight.device)
        new.train(linear.training)
        return new

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's parameters (bit-identical weights)."""
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight, linear.bias = self.weight, self.bias
        linear.train(self.training)
        return linear

    def reset_amax_history(self) -> None:
        """Forget the delayed-scaling history (the next step re-derives scales from current amaxes)."""
        if self.fp8_amax_history is not None:
            self.fp8_amax_history.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features), in x's dtype (the autocast dtype under autocast)."""
        return _float8_forward(self, x, self.weight, self.bias)

    def extra_repr(self) -> str:
        emulated = ", emulate=True" if self.config.emulate else ""
        return (f"{super().extra_repr()}, recipe={self.config.recipe.value}, "
                f"formats={self.config.forward_format.value}/{self.config.grad_format.value}{emulated}")
