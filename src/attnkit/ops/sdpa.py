"""The `flash`, `efficient` and `cudnn` backends: PyTorch's fused attention kernels, called directly.

Every eager call goes straight to an ATen kernel (each differentiable in C++), never through
``F.scaled_dot_product_attention`` with one kernel forced, so no process-wide SDPA flag changes and
calls from several threads or streams don't interfere:

* CPU flash: ``_scaled_dot_product_flash_attention_for_cpu`` (bool masks become additive; GQA native);
* CUDA without a mask: ``_scaled_dot_product_flash_attention`` (its ``is_causal`` is bottom-right,
  FlashAttention-2's convention; GQA native), ``_scaled_dot_product_cudnn_attention`` (top-left
  causal; GQA native where :func:`cudnn_native_gqa` finds it, else K/V repeated) and
  ``_efficient_attention_forward`` (``custom_mask_type`` 1 = top-left, 2 = bottom-right);
  with ``return_lse`` the ``ops.kernels`` pair inside an ``autograd.Function`` (which also
  backpropagates a gradient of the lse);
* CUDA with a mask, or a causal offset the kernel's flag cannot express (``_cuda_biased``): the mask
  merged with causality as an additive ``attn_bias`` in q's dtype, aligned as SDPA's dispatcher
  aligns it, into ``_scaled_dot_product_efficient_attention`` or ``_scaled_dot_product_cudnn_attention``
  (K/V repeated for GQA; flash takes no bias). The efficient kernel backpropagates into the bias
  (so into a float mask that needs a gradient); cuDNN does not (its support rule says so). While
  ``torch.compile`` traces, such a call goes to ``F.scaled_dot_product_attention`` with the compact
  bias instead (Inductor writes an explicitly expanded bias out in full per layer), and torch picks
  the masked kernel.

Rows with no allowed key are opened in the bias (a uniform row) and zeroed afterwards, because
kernels disagree on them (NaN, zeros or uniform). The CPU flash kernel returns zeros for a query row
holding NaN where the math path gives NaN; ``_nan_rows_like_math`` restores NaN there (measured on
CPU with torch 2.13).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from attnkit.errors import UnsupportedError
from attnkit.ops import kernels
from attnkit.ops.cache import per_mask
from attnkit.ops.masks import call_mask, empty_rows
from attnkit.ops.options import AttentionOptions
from attnkit.ops.spec import AttentionSpec

__all__ = [
    "flash_attention",
    "efficient_attention",
    "cudnn_attention",
    "flash_support",
    "efficient_support",
    "cudnn_support",
    "flash_plan",
    "cudnn_plan",
    "efficient_plan",
    "cudnn_native_gqa",
]

_HALF = (torch.float16, torch.bfloat16)
# Head-dim limits of the CUDA kernels (torch 2.5-2.11); raise them when the benchmark shows more works.
FLASH_MAX_HEAD_DIM = 256
CUDNN_MAX_HEAD_DIM = 128
# Stride alignment (elements) of an attn_bias for the efficient kernel: SDPA's `preprocess_mask`
# (aten/src/ATen/native/transformers/attention.cpp, torch 2.5-2.13) pads to it.
_BIAS_ALIGNMENT = 8
_aten = torch.ops.aten


# ---------------------------------------------------------------- support rules


def _cuda_capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def _common_reason(spec: AttentionSpec) -> str | None:
    """Reasons shared by every fused kernel."""
    if spec.dropout_mask:
        return "the fused kernels draw their own dropout and cannot take a dropout_mask"
    if spec.mask == "block":
        return "the fused SDPA kernels take no BlockMask (flex does)"
    if spec.need_lse and (spec.device != "cuda" or spec.mask != "none" or spec.dropout_p > 0):
        return "the log-sum-exp comes only from the CUDA kernels without a mask or dropout (use chunked or flex)"
    return None


def _cuda_reason(name: str, spec: AttentionSpec, dtypes: tuple[torch.dtype, ...]) -> str | None:
    if spec.device != "cuda":
        return f"{name} runs on cuda only, got device {spec.device!r}"
    if spec.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        return f"{name} needs dtype {names}, got {str(spec.dtype).removeprefix('torch.')}"
    capability = _cuda_capability()
    if capability is not None and capability < (8, 0):
        return f"{name} needs compute capability >= 8.0, got {capability[0]}.{capability[1]}"
    return None


def _bottom_right(spec: AttentionSpec) -> bool:
    """Causal at the bottom-right offset with every row seeing a key (Sq <= Skv)."""
    return spec.offset == spec.seq_kv - spec.seq_q and spec.seq_q <= spec.seq_kv


def _unmasked_causal_reason(name: str, spec: AttentionSpec, *, bottom_right: bool, top_left: bool) -> str | None:
    if not spec.causal or spec.mask != "none":
        return None
    if (bottom_right and _bottom_right(spec)) or (top_left and spec.offset == 0):
        return None
    if spec.seq_q == 1 and spec.offset >= spec.seq_kv - 1:
        return None  # one query row that sees every key: no mask at all
    return f"{name} cannot apply causal with offset {spec.offset} at Sq={spec.seq_q}, Skv={spec.seq_kv} without a mask"


def flash_support(spec: AttentionSpec) -> str | None:
    if reason := _common_reason(spec):
        return reason
    if spec.head_dim != spec.head_dim_v:
        return f"flash needs D == Dv, got D={spec.head_dim}, Dv={spec.head_dim_v}"
    if spec.device == "cpu":
        if spec.mask_requires_grad:
            return "the CPU flash kernel does not backpropagate into the mask"
        return "the CPU flash kernel has no dropout" if spec.dropout_p > 0 else None
    if reason := _cuda_reason("flash", spec, _HALF):
        return reason
    if spec.head_dim > FLASH_MAX_HEAD_DIM or spec.head_dim % 8:
        return f"flash on CUDA needs D <= {FLASH_MAX_HEAD_DIM} and a multiple of 8, got {spec.head_dim}"
    if spec.mask != "none":
        return f"flash on CUDA takes no attention mask, got a {spec.mask} mask"
    return _unmasked_causal_reason("flash", spec, bottom_right=True, top_left=spec.seq_q == spec.seq_kv)


def efficient_support(spec: AttentionSpec) -> str | None:
    if reason := _common_reason(spec) or _cuda_reason("efficient", spec, (*_HALF, torch.float32)):
        return reason
    alignment = 8 if spec.dtype in _HALF else 4
    if spec.head_dim % alignment or spec.head_dim_v % alignment:
        return f"efficient needs D and Dv divisible by {alignment} in {spec.dtype}, got D={spec.head_dim}, Dv={spec.head_dim_v}"
    if spec.need_lse:
        return _unmasked_causal_reason("efficient", spec, bottom_right=True, top_left=False)
    return None  # a causal offset the kernel cannot express becomes a mask


def cudnn_support(spec: AttentionSpec) -> str | None:
    if reason := _common_reason(spec) or _cuda_reason("cudnn", spec, _HALF):
        return reason
    if spec.head_dim != spec.head_dim_v or spec.head_dim % 8 or spec.head_dim > CUDNN_MAX_HEAD_DIM:
        return f"cudnn needs D == Dv, divisible by 8 and <= {CUDNN_MAX_HEAD_DIM}, got D={spec.head_dim}, Dv={spec.head_dim_v}"
    if spec.dropout_p > 0:
        return "cudnn SDPA dropout is not supported here"
    if spec.mask_requires_grad:
        return "cudnn does not backpropagate into the mask (its attn_bias gets no gradient)"
    if spec.need_lse and spec.causal and spec.seq_q != spec.seq_kv and spec.seq_q != 1:
        return "cudnn's lse path aligns causal only for Sq == Skv"
    return _unmasked_causal_reason("cudnn", spec, bottom_right=False, top_left=True)


# ---------------------------------------------------------------- CPU flash


def _nan_rows_like_math(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """NaN in the rows of ``out`` whose query holds NaN/inf, as the math path gives (float32 sum: no overflow)."""
    return out + (q.sum(dim=-1, keepdim=True, dtype=torch.float32) * 0).to(out.dtype)


def _bias(options: AttentionOptions, seq_q: int, seq_kv: int, dtype: torch.dtype, device: torch.device):
    """``(attn_bias | None, empty rows | None)``: the call's merged mask as an additive 4-D bias in ``dtype``
    (``-inf`` where a bool mask forbids), its empty rows opened; built once per mask object.

    On CUDA the bias spans every key (``Skv``) with each stride but the last a multiple of
    ``_BIAS_ALIGNMENT``, as the efficient kernel reads it (a padded tensor sliced back, like SDPA's
    ``preprocess_mask``; the slice keeps the gradient path to a mask that needs one).
    """
    merged = call_mask(options, seq_q, seq_kv, dtype=dtype, device=device)
    if merged is None:
        return None, None

    def build():
        empty = empty_rows(merged)
        bias = merged
        if merged.dtype == torch.bool:
            bias = torch.zeros(merged.shape, dtype=dtype, device=device).masked_fill(~merged, float("-inf"))
        if empty is not None:
            bias = bias.masked_fill(empty, 0.0)  # open empty rows; their output is zeroed afterwards
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        if device.type == "cuda":
            bias = _aligned(bias.expand(*bias.shape[:-1], seq_kv))
        return bias, empty

    return per_mask(merged, ("sdpa-bias", dtype), build)  # per_mask rebuilds for a mask needing a gradient


def _aligned(bias: torch.Tensor) -> torch.Tensor:
    if bias.stride(-1) == 1 and all(stride % _BIAS_ALIGNMENT == 0 for stride in bias.stride()[:-1]):
        return bias
    size = bias.shape[-1]
    return F.pad(bias, (0, _BIAS_ALIGNMENT - size % _BIAS_ALIGNMENT))[..., :size]


def _cpu_flash(q, k, v, options: AttentionOptions):
    attn_mask, empty = _bias(options, q.shape[2], k.shape[2], q.dtype, q.device)
    out, _ = torch._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=attn_mask, scale=options.scale)
    out = _nan_rows_like_math(out, q)
    return (out if empty is None else out.masked_fill(empty, 0.0)), None


# ---------------------------------------------------------------- CUDA, no mask


def _expand(k, v, heads_q):
    group = heads_q // k.shape[1]
    return (k, v) if group == 1 else (k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))


_native_gqa: bool | None = None  # cudnn_native_gqa's answer, found once per process


def cudnn_native_gqa() -> bool:
    """Whether this torch's cuDNN attention op takes fewer K/V heads than query heads (GQA) itself.

    Found once, eagerly, from one tiny causal call, forward and backward, against the same call on
    K/V repeated to every query head (torch 2.11 on an H200: yes, and transformers' ``F.sdpa`` with
    ``enable_gqa`` runs it: 0.84 ms forward against 1.28 ms for flash on Llama-GQA at batch 64,
    ``benchmarks/results/optimize/optimize-nvidia-h200-2026-11-27.json``, kernel profiles). While
    ``torch.compile`` traces before the probe ran, the answer is False (K/V repeated: always exact).
    """
    global _native_gqa
    if _native_gqa is None:
        if torch.compiler.is_compiling() or not torch.cuda.is_available():
            return False
        # Real tensors with autograd, whatever the caller's context: no_grad or inference mode (optimize's
        # analysis), autocast, a fake-tensor or other dispatch mode (analyze, discover) would make the probe
        # fail, and its answer is kept for the process.
        with _disable_current_modes(), torch.inference_mode(False), torch.enable_grad(), torch.autocast("cuda", enabled=False):
            _native_gqa = _probe_cudnn_gqa()
    return _native_gqa


def _probe_cudnn_gqa() -> bool:
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, heads, 128, 64, device="cuda", dtype=torch.bfloat16, generator=generator) for heads in (4, 2, 2))
    results = []
    try:
        for key, value in ((k, v), _expand(k, v, 4)):
            leaves = [t.detach().requires_grad_(True) for t in (q, key, value)]
            out = torch._scaled_dot_product_cudnn_attention(*leaves, None, True, 0.0, True, False)[0]
            out.float().square().sum().backward()
            results.append([out.float()] + [t.grad.float() for t in leaves])
    except RuntimeError:
        return False
    (out, dq, dk, dv), (out_r, dq_r, dk_r, dv_r) = results
    dk_r, dv_r = (g.unflatten(1, (2, 2)).sum(2) for g in (dk_r, dv_r))  # each K/V head's share summed over its group
    return all(a.shape == b.shape and torch.allclose(a, b, rtol=2e-2, atol=2e-2) for a, b in
               ((out, out_r), (dq, dq_r), (dk, dk_r), (dv, dv_r)))  # fmt: skip


class _WithLse(torch.autograd.Function):
    """``ops.kernels`` forward and backward (including the gradient of the lse) as one autograd node."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, kernel):
        out, lse = kernels.forward_with_lse(q, k, v, causal=causal, scale=scale, kernel=kernel)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (causal, scale, kernel)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, kernel = ctx.options
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grads = kernels.backward_from_lse(grad_out, q, k, v, out, lse, causal=causal, scale=scale, grad_lse=grad_lse, kernel=kernel)
        return (*grads, None, None, None)


def _is_causal(options: AttentionOptions, seq_q: int, seq_kv: int) -> bool:
    """False when causality hides nothing (one query row that sees every key)."""
    return options.causal and not (seq_q == 1 and options.causal_offset(1, seq_kv) >= seq_kv - 1)


def _cuda_unmasked(kernel: str, q, k, v, options: AttentionOptions):
    seq_q, seq_kv = q.shape[2], k.shape[2]
    causal = _is_causal(options, seq_q, seq_kv)
    if options.return_lse:
        return _WithLse.apply(q, k, v, causal, options.scale, kernel)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if kernel == "flash":  # bottom-right causal == top-left when Sq == Skv
        return torch._scaled_dot_product_flash_attention(q, k, v, options.dropout_p, causal, False, scale=options.scale)[0], None
    if not (kernel == "cudnn" and cudnn_native_gqa()):
        k, v = _expand(k, v, q.shape[1])
    if kernel == "cudnn":
        return torch._scaled_dot_product_cudnn_attention(q, k, v, None, grad, 0.0, causal, False, scale=options.scale)[0], None
    bottom_right = options.causal_offset(seq_q, seq_kv) == seq_kv - seq_q
    mask_type = 0 if not causal else (2 if bottom_right else 1)
    t = lambda x: x.transpose(1, 2)  # noqa: E731  the kernel's layout is (B, S, H, D)
    out = _aten._efficient_attention_forward(
        t(q), t(k), t(v), None, None, None, None, None, options.dropout_p, mask_type, grad, scale=options.scale
    )[0]  # fmt: skip
    return t(out), None


# ---------------------------------------------------------------- CUDA with a mask: an additive bias


def _cuda_biased(kernel: str, q, k, v, options: AttentionOptions):
    """The call's mask (and causality at its offset) as an ``attn_bias``; ``is_causal`` stays False."""
    if kernel == "flash":
        raise UnsupportedError("flash on CUDA takes no attention mask (and no causal offset but bottom-right)")
    batch, heads_q, seq_q = q.shape[:3]
    bias, empty = _bias(options, seq_q, k.shape[2], q.dtype, q.device)
    k, v = _expand(k, v, heads_q)
    if torch.compiler.is_compiling():
        # Under Inductor a bias handed to the kernel op expanded over the heads is written out in full
        # for every layer (B*H*Sq*Skv: 4 of GPT-2's 50 ms at batch 64, seq 1024 on an H200); on
        # F.scaled_dot_product_attention's own path the broadcast mask stays compact
        # (benchmarks/results/optimize/optimize-nvidia-h200-2026-11-27.json, profiles). Torch then
        # picks the masked kernel (cuDNN on Hopper); semantics are the same, empty rows zeroed below.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=options.dropout_p, scale=options.scale)
        return (out if empty is None else out.masked_fill(empty, 0.0)), None
    if bias is not None:
        bias = bias.expand(batch, heads_q, seq_q, k.shape[2])  # broadcast dims keep stride 0
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias))
    if kernel == "cudnn":  # compute_log_sumexp: the backward reads it
        out = torch._scaled_dot_product_cudnn_attention(q, k, v, bias, grad, options.dropout_p, False, False, scale=options.scale)[0]
    else:
        out = torch._scaled_dot_product_efficient_attention(q, k, v, bias, grad, options.dropout_p, False, scale=options.scale)[0]
    return (out if empty is None else out.masked_fill(empty, 0.0)), None


# ---------------------------------------------------------------- plans: the hot path of repeated calls


def _plan(kernel: str):
    """``plan(spec)``: for an unmasked CUDA call without the lse, the kernel call with every decision
    taken once (``attention()`` remembers it per call key); None = the general ``run``."""

    def plan(spec: AttentionSpec):
        if spec.device != "cuda" or spec.mask != "none" or spec.dropout_mask or spec.need_lse:
            return None
        causal = spec.causal and not (spec.seq_q == 1 and spec.offset >= spec.seq_kv - 1)
        if causal and not (spec.offset == 0 and spec.seq_q == spec.seq_kv or kernel == "flash" and _bottom_right(spec)):
            return None
        grad, expand = spec.requires_grad, spec.heads_q != spec.heads_kv
        # torch's own bindings of the ATen ops: a C call, 1-2 µs less per call than torch.ops.aten's
        # Python OpOverload (host time is what a small, host-bound call costs)
        if kernel == "flash":
            op = torch._scaled_dot_product_flash_attention

            def call(q, k, v, options):
                return op(q, k, v, options.dropout_p, causal, False, scale=options.scale)[0]
        elif kernel == "cudnn" and (not expand or cudnn_native_gqa()):
            op = torch._scaled_dot_product_cudnn_attention

            def call(q, k, v, options):
                return op(q, k, v, None, grad, 0.0, causal, False, scale=options.scale)[0]
        elif kernel == "efficient" and not expand:  # causal here is top-left == bottom-right (Sq == Skv)
            op = torch._scaled_dot_product_efficient_attention

            def call(q, k, v, options):
                return op(q, k, v, None, grad, options.dropout_p, causal, scale=options.scale)[0]
        else:
            return None

        def run(q, k, v, options: AttentionOptions):
            try:
                return call(q, k, v, options), None
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as error:
                raise _refused(kernel, error) from error

        return run

    return plan


flash_plan, cudnn_plan, efficient_plan = _plan("flash"), _plan("cudnn"), _plan("efficient")


# ---------------------------------------------------------------- the backends


def _needs_mask(options: AttentionOptions, kernel: str, seq_q: int, seq_kv: int) -> bool:
    if options.mask is not None:
        return True
    if not _is_causal(options, seq_q, seq_kv):
        return False
    offset = options.causal_offset(seq_q, seq_kv)
    return kernel != "efficient" and not (offset == 0 and seq_q == seq_kv or kernel == "flash" and offset == seq_kv - seq_q)


def _run(kernel: str, q, k, v, options: AttentionOptions):
    try:
        if q.device.type == "cpu":
            return _cpu_flash(q, k, v, options)
        if _needs_mask(options, kernel, q.shape[2], k.shape[2]) or (kernel == "efficient" and _offset_not_native(options, q, k)):
            return _cuda_biased(kernel, q, k, v, options)
        return _cuda_unmasked(kernel, q, k, v, options)
    except (torch.OutOfMemoryError, UnsupportedError):
        raise
    except RuntimeError as error:
        raise _refused(kernel, error) from error


def _refused(kernel: str, error: RuntimeError) -> UnsupportedError:
    """A kernel's own constraint check failed (a layout, alignment or size the support rule did not
    foresee): auto remembers the refusal for this call's layout and runs the next backend."""
    return UnsupportedError(f"the {kernel} kernel refused this call (torch {torch.__version__}): {str(error)[:300]}")


def _offset_not_native(options: AttentionOptions, q, k) -> bool:
    """The efficient kernel aligns causal top-left or bottom-right only, and leaves rows with no key
    (bottom-right with Sq > Skv) unzeroed (measured: H200, torch 2.11)."""
    seq_q, seq_kv = q.shape[2], k.shape[2]
    offset = options.causal_offset(seq_q, seq_kv)
    return _is_causal(options, seq_q, seq_kv) and (offset not in (0, seq_kv - seq_q) or offset < 0)


def flash_attention(q, k, v, options: AttentionOptions):
    """Shapes as in ``attention()``; returns ``(out, lse | None)``."""
    return _run("flash", q, k, v, options)


def efficient_attention(q, k, v, options: AttentionOptions):
    return _run("efficient", q, k, v, options)


def cudnn_attention(q, k, v, options: AttentionOptions):
    return _run("cudnn", q, k, v, options)
