"""The `flash`, `efficient` and `cudnn` backends: PyTorch SDPA with one kernel forced.

Bottom-right causal equals SDPA's top-left ``is_causal`` only when ``Sq == Skv``; for
``Sq == 1`` it allows every key; otherwise the causal mask is materialized and merged with
``mask``. Rows with no allowed key are zeroed afterwards because kernels disagree on them
(NaN, zeros or uniform).
Probed on CPU with torch 2.13: only the flash kernel runs on CPU (it takes bool and additive
masks and GQA, but no dropout and needs ``D == Dv``); efficient and cuDNN are CUDA-only.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, _backend_names, sdpa_kernel

from attnkit.errors import UnsupportedError
from attnkit.ops.masks import empty_rows, merged_mask
from attnkit.ops.spec import AttentionSpec

__all__ = ["flash_attention", "efficient_attention", "cudnn_attention", "flash_support", "efficient_support", "cudnn_support"]

_HALF = (torch.float16, torch.bfloat16)
# Head-dim limits of the CUDA kernels (torch 2.5-2.11); raise them when the benchmark shows more works.
FLASH_MAX_HEAD_DIM = 256
CUDNN_MAX_HEAD_DIM = 128
# How torch says that the forced kernel refused the call (torch 2.5-2.13).
_REFUSALS = ("No available kernel", "No viable backend")


# Forcing one kernel. `sdpa_kernel` is exact but, entered per call, costs more than a small kernel
# (a generator context manager that reads and rewrites every backend flag by name, twice: ~35 µs
# per call on a loaded 2-core CPU box, torch 2.13). `_sdpa_only` sets the same process-wide flags
# (only `kernel` enabled, priority order untouched, as `sdpa_kernel(kernel)` does), but through the
# C getters/setters, only those that differ, restored in `finally`. We keep SDPA's own dispatcher
# instead of calling `torch.ops.aten._scaled_dot_product_{flash,efficient,cudnn}_attention`
# directly: the dispatcher pads head dims, converts and aligns masks, and runs each kernel's
# constraint checks, raising "No available kernel" (which auto turns into a fallback) instead of
# launching a kernel on inputs it cannot take; the private ops skip all of that and their
# signatures differ across torch 2.5-2.13. Dynamo understands only `sdpa_kernel` (not the private
# setters), so traced calls use it. `_backend_names` is what `sdpa_kernel` itself iterates.
_FLAGS = tuple(
    (getattr(torch._C, f"_get_{name}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{name}"), getattr(SDPBackend, member))
    for name, member in _backend_names.items()
)
_ONLY = {kernel: tuple((get, set_, backend == kernel) for get, set_, backend in _FLAGS) for _, _, kernel in _FLAGS}


def _sdpa_only(kernel: SDPBackend, q, k, v, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with only ``kernel`` enabled, like ``with sdpa_kernel(kernel)``."""
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


def _cuda_capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def _sdpa_reason(spec: AttentionSpec) -> str | None:
    """Reasons shared by every SDPA kernel."""
    if spec.dropout_mask:
        return "SDPA kernels draw their own dropout and cannot take a dropout_mask"
    if spec.need_lse:
        return "SDPA does not return the log-sum-exp (use chunked or flex)"
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


def _causal_needs_mask(spec: AttentionSpec) -> bool:
    return spec.causal and spec.seq_q != spec.seq_kv and spec.seq_q != 1


def flash_support(spec: AttentionSpec) -> str | None:
    if reason := _sdpa_reason(spec):
        return reason
    if spec.head_dim != spec.head_dim_v:
        return f"flash needs D == Dv, got D={spec.head_dim}, Dv={spec.head_dim_v}"
    if spec.device == "cpu":
        if spec.mask_requires_grad:
            return "the CPU flash kernel does not backpropagate into the mask"
        return "the CPU flash kernel has no dropout" if spec.dropout_p > 0 else None
    if reason := _cuda_reason("flash", spec, _HALF):
        return reason
    if spec.head_dim > FLASH_MAX_HEAD_DIM:
        return f"flash on CUDA needs D <= {FLASH_MAX_HEAD_DIM}, got {spec.head_dim}"
    if spec.mask != "none":
        return f"flash on CUDA takes no attention mask, got a {spec.mask} mask"
    if _causal_needs_mask(spec):
        return f"flash on CUDA cannot align causal bottom-right with Sq={spec.seq_q} != Skv={spec.seq_kv} (needs a mask)"
    return None


def efficient_support(spec: AttentionSpec) -> str | None:
    if reason := _sdpa_reason(spec) or _cuda_reason("efficient", spec, (*_HALF, torch.float32)):
        return reason
    alignment = 8 if spec.dtype in _HALF else 4
    if spec.head_dim % alignment or spec.head_dim_v % alignment:
        return f"efficient needs D and Dv divisible by {alignment} in {spec.dtype}, got D={spec.head_dim}, Dv={spec.head_dim_v}"
    return None


def cudnn_support(spec: AttentionSpec) -> str | None:
    if reason := _sdpa_reason(spec) or _cuda_reason("cudnn", spec, _HALF):
        return reason
    if spec.head_dim != spec.head_dim_v or spec.head_dim % 8 or spec.head_dim > CUDNN_MAX_HEAD_DIM:
        return f"cudnn needs D == Dv, divisible by 8 and <= {CUDNN_MAX_HEAD_DIM}, got D={spec.head_dim}, Dv={spec.head_dim_v}"
    if spec.dropout_p > 0:
        return "cudnn SDPA dropout is not supported here"
    if spec.mask != "none" or _causal_needs_mask(spec):
        return "cudnn takes no attention mask (and bottom-right causal with Sq != Skv needs one)"
    return None


def _sdpa(kernel: SDPBackend, native_gqa: bool, q, k, v, *, mask, causal, scale, dropout_p, dropout_mask, return_lse):
    assert dropout_mask is None and not return_lse, "support rules exclude these"
    seq_q, seq_kv = q.shape[2], k.shape[2]
    if k.shape[1] != q.shape[1] and not native_gqa:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    is_causal, attn_mask = False, None
    if causal and mask is None and seq_q == seq_kv:
        is_causal = True
    elif not (causal and mask is None and seq_q == 1):  # one query row sees every key bottom-right
        attn_mask = merged_mask(mask, causal, seq_q, seq_kv, dtype=q.dtype, device=q.device)
    empty = empty_rows(attn_mask)
    if empty is not None:
        # Kernels may give NaN (in forward or backward) for rows with no allowed key: open those
        # rows up and zero their output below, which also zeroes their gradient.
        attn_mask = attn_mask.masked_fill(empty, True if attn_mask.dtype == torch.bool else 0.0)
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))  # CPU flash: 2-D or 4-D only
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}

    def call() -> torch.Tensor:
        return _sdpa_only(kernel, q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **gqa)

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


flash_attention = functools.partial(_sdpa, SDPBackend.FLASH_ATTENTION, True)
efficient_attention = functools.partial(_sdpa, SDPBackend.EFFICIENT_ATTENTION, False)
cudnn_attention = functools.partial(_sdpa, SDPBackend.CUDNN_ATTENTION, False)
