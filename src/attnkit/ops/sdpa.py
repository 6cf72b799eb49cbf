"""The `flash`, `efficient` and `cudnn` backends: PyTorch's fused attention kernels, called directly.

Calls go straight to the ATen kernels (each differentiable in C++), not through
``F.scaled_dot_product_attention`` with one kernel forced, so no process-wide SDPA flag changes
and calls from several threads or streams don't interfere:

* CPU flash: ``_scaled_dot_product_flash_attention_for_cpu`` (bool masks become additive; GQA native);
* CUDA without a mask: ``_scaled_dot_product_flash_attention`` (its ``is_causal`` is bottom-right,
  FlashAttention-2's convention; GQA native), ``_scaled_dot_product_cudnn_attention`` (top-left
  causal) and ``_efficient_attention_forward`` (``custom_mask_type`` 1 = top-left, 2 = bottom-right);
  with ``return_lse`` the ``ops.kernels`` pair inside an ``autograd.Function`` (which also
  backpropagates a gradient of the lse);
* CUDA with a mask or a dropout mask: still SDPA's dispatcher with the kernel forced
  (``_sdpa_forced``), which aligns and pads the bias for the kernel. That sets process-wide flags
  for the duration of the call (restored in ``finally``); it is the one place left that does.

Rows with no allowed key are zeroed afterwards because kernels disagree on them (NaN, zeros or
uniform). The CPU flash kernel returns zeros for a query row holding NaN where the math path gives
NaN; ``_nan_rows_like_math`` restores NaN there (measured on CPU with torch 2.13).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, _backend_names, sdpa_kernel

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
]

_HALF = (torch.float16, torch.bfloat16)
# Head-dim limits of the CUDA kernels (torch 2.5-2.11); raise them when the benchmark shows more works.
FLASH_MAX_HEAD_DIM = 256
CUDNN_MAX_HEAD_DIM = 128
# How torch says that the forced kernel refused the call (torch 2.5-2.13).
_REFUSALS = ("No available kernel", "No viable backend")
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
    if spec.mask != "none":
        return "cudnn takes no attention mask"
    if spec.need_lse and spec.causal and spec.seq_q != spec.seq_kv and spec.seq_q != 1:
        return "cudnn's lse path aligns causal only for Sq == Skv"
    return _unmasked_causal_reason("cudnn", spec, bottom_right=False, top_left=True)


# ---------------------------------------------------------------- CPU flash


def _nan_rows_like_math(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """NaN in the rows of ``out`` whose query holds NaN/inf, as the math path gives (float32 sum: no overflow)."""
    return out + (q.sum(dim=-1, keepdim=True, dtype=torch.float32) * 0).to(out.dtype)


def _cpu_mask(options: AttentionOptions, seq_q: int, seq_kv: int, dtype: torch.dtype):
    """``(additive 4-D mask | None, empty rows | None)`` for the CPU flash kernel, built once per mask."""
    merged = call_mask(options, seq_q, seq_kv, dtype=dtype, device=torch.device("cpu"))
    if merged is None:
        return None, None

    def build():
        empty = empty_rows(merged)
        additive = merged
        if merged.dtype == torch.bool:
            additive = torch.zeros(merged.shape, dtype=dtype).masked_fill(~merged, float("-inf"))
        if empty is not None:
            additive = additive.masked_fill(empty, 0.0)  # open empty rows; their output is zeroed below
        return additive.reshape((1,) * (4 - additive.dim()) + tuple(additive.shape)), empty

    if options.mask is not None and options.mask.requires_grad:
        return build()
    return per_mask(merged, ("cpu-flash", dtype), build)


def _cpu_flash(q, k, v, options: AttentionOptions):
    attn_mask, empty = _cpu_mask(options, q.shape[2], k.shape[2], q.dtype)
    out, _ = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=attn_mask, scale=options.scale)
    out = _nan_rows_like_math(out, q)
    return (out if empty is None else out.masked_fill(empty, 0.0)), None


# ---------------------------------------------------------------- CUDA, no mask


def _expand(k, v, heads_q):
    group = heads_q // k.shape[1]
    return (k, v) if group == 1 else (k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))


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
        return _aten._scaled_dot_product_flash_attention(q, k, v, options.dropout_p, causal, False, scale=options.scale)[0], None
    k, v = _expand(k, v, q.shape[1])
    if kernel == "cudnn":
        return _aten._scaled_dot_product_cudnn_attention(q, k, v, None, grad, 0.0, causal, False, scale=options.scale)[0], None
    bottom_right = options.causal_offset(seq_q, seq_kv) == seq_kv - seq_q
    mask_type = 0 if not causal else (2 if bottom_right else 1)
    t = lambda x: x.transpose(1, 2)  # noqa: E731  the kernel's layout is (B, S, H, D)
    out = _aten._efficient_attention_forward(
        t(q), t(k), t(v), None, None, None, None, None, options.dropout_p, mask_type, grad, scale=options.scale
    )[0]  # fmt: skip
    return t(out), None


# ---------------------------------------------------------------- CUDA with a mask: SDPA's dispatcher


_FLAGS = tuple(
    (getattr(torch._C, f"_get_{name}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{name}"), getattr(SDPBackend, member))
    for name, member in _backend_names.items()
)
_ONLY = {kernel: tuple((get, set_, backend == kernel) for get, set_, backend in _FLAGS) for _, _, kernel in _FLAGS}


def _sdpa_forced(kernel: SDPBackend, q, k, v, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with only ``kernel`` enabled (what ``sdpa_kernel(kernel)`` does,
    through the C setters, only those that differ, restored in ``finally``)."""
    if torch.compiler.is_compiling():
        with sdpa_kernel(kernel):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    changed = []
    for get, set_, enabled in _ONLY[kernel]:
        if get() != enabled:
            set_(enabled)
            changed.append((set_, not enabled))
    try:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    finally:
        for set_, enabled in changed:
            set_(enabled)


def _cuda_masked(kernel: SDPBackend, q, k, v, options: AttentionOptions):
    seq_q, seq_kv = q.shape[2], k.shape[2]
    k, v = _expand(k, v, q.shape[1])
    attn_mask = call_mask(options, seq_q, seq_kv, dtype=q.dtype, device=q.device)
    empty = empty_rows(attn_mask)
    if empty is not None:
        attn_mask = attn_mask.masked_fill(empty, True if attn_mask.dtype == torch.bool else 0.0)

    def call() -> torch.Tensor:
        return _sdpa_forced(kernel, q, k, v, attn_mask=attn_mask, dropout_p=options.dropout_p, scale=options.scale)

    try:
        out = call()
    except RuntimeError as error:
        if not any(text in str(error) for text in _REFUSALS):
            raise  # a real failure (out of memory, a kernel error), not a refusal
        # torch gives its reasons for refusing a kernel only as warnings: rerun to collect them.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                call()
            except RuntimeError:
                pass
        reasons = "; ".join(text for w in caught if (text := str(w.message).split(" (Triggered")[0].strip(" :"))) or str(error)
        raise UnsupportedError(f"torch {torch.__version__} has no {kernel.name} kernel for this call: {reasons}") from error
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
        if kernel == "flash":
            op = _aten._scaled_dot_product_flash_attention.default

            def call(q, k, v, options):
                return op(q, k, v, options.dropout_p, causal, False, scale=options.scale)[0]
        elif kernel == "cudnn" and not expand:
            op = _aten._scaled_dot_product_cudnn_attention.default

            def call(q, k, v, options):
                return op(q, k, v, None, grad, 0.0, causal, False, scale=options.scale)[0]
        elif kernel == "efficient" and not expand:
            op, mask_type = _aten._efficient_attention_forward.default, 1 if causal else 0

            def call(q, k, v, options):
                out = op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, None, None, None,
                         options.dropout_p, mask_type, grad, scale=options.scale)[0]  # fmt: skip
                return out.transpose(1, 2)
        else:
            return None

        def run(q, k, v, options: AttentionOptions):
            try:
                return call(q, k, v, options), None
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as error:
                raise UnsupportedError(f"the {kernel} kernel refused this call (torch {torch.__version__}): {str(error)[:300]}") from error

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


def _run(kernel: str, sdp: SDPBackend, q, k, v, options: AttentionOptions):
    if q.device.type != "cpu" and (
        _needs_mask(options, kernel, q.shape[2], k.shape[2]) or (kernel == "efficient" and _offset_not_native(options, q, k))
    ):
        return _cuda_masked(sdp, q, k, v, options)
    try:
        return _cpu_flash(q, k, v, options) if q.device.type == "cpu" else _cuda_unmasked(kernel, q, k, v, options)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:
        # A kernel's own constraint check (a layout or alignment the support rule did not foresee):
        # auto remembers the refusal for this call's layout and runs the next backend.
        raise UnsupportedError(f"the {kernel} kernel refused this call (torch {torch.__version__}): {str(error)[:300]}") from error


def _offset_not_native(options: AttentionOptions, q, k) -> bool:
    """The efficient kernel aligns causal top-left or bottom-right only, and leaves rows with no key
    (bottom-right with Sq > Skv) unzeroed (measured: H200, torch 2.11)."""
    seq_q, seq_kv = q.shape[2], k.shape[2]
    offset = options.causal_offset(seq_q, seq_kv)
    return _is_causal(options, seq_q, seq_kv) and (offset not in (0, seq_kv - seq_q) or offset < 0)


def flash_attention(q, k, v, options: AttentionOptions):
    """Shapes as in ``attention()``; returns ``(out, lse | None)``."""
    return _run("flash", SDPBackend.FLASH_ATTENTION, q, k, v, options)


def efficient_attention(q, k, v, options: AttentionOptions):
    return _run("efficient", SDPBackend.EFFICIENT_ATTENTION, q, k, v, options)


def cudnn_attention(q, k, v, options: AttentionOptions):
    return _run("cudnn", SDPBackend.CUDNN_ATTENTION, q, k, v, options)
