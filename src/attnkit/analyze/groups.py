"""Kernel groups shared by predictions and measurements, so errors can be located per group.

A predicted :class:`~attnkit.analyze.partition.Kernel` is grouped by its category and the ops it
runs; a measured CUDA kernel by its name (cuBLAS ``nvjet``/``gemm``, cuDNN/flash attention,
ATen's ``layer_norm`` kernels, ``elementwise`` kernels, inductor's ``triton_poi``/``triton_per``).
"""

from __future__ import annotations

import re

from attnkit.analyze.partition import Kernel

__all__ = ["GROUPS", "memory_kind", "predicted_group", "measured_group"]

GROUPS = ("gemm", "attention", "conv", "norm", "elementwise", "other")
"""Kernel groups: GEMMs, fused attention, convolutions (with their layout transposes), norms,
pointwise/activation/softmax kernels, everything else (copies, gathers, reductions, cat)."""

_NORMS = ("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "group_norm", "native_group_norm",
          "batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training")
_SOFTMAX = ("softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax")
_ACTIVATIONS = ("gelu", "silu", "tanh", "sigmoid", "erf", "exp", "pow", "sqrt", "rsqrt", "log", "sin", "cos", "mish",
                "softplus", "elu", "hardswish")
_MEMORY_KINDS = {"pointwise": "pointwise", "factory": "pointwise", "reduction": "reduction", "gather": "gather",
                 "copy": "copy", "relayout": "copy"}

_MEASURED = (  # first match wins; names as torch.profiler reports CUDA kernels
    ("attention", re.compile(r"flash|fmha|sdpa|attention|attn", re.I)),
    ("conv", re.compile(r"fprop|dgrad|conv|nchwToNhwc|nhwcToNchw|implicit_gemm", re.I)),
    ("gemm", re.compile(r"nvjet|gemm|cublas|cutlass|xmma|_mm_|matmul|splitK|triton_tem_", re.I)),  # triton_tem_: Inductor GEMM templates
    ("norm", re.compile(r"norm", re.I)),
    ("elementwise", re.compile(r"elementwise|triton_poi|softmax|gelu|activation", re.I)),
)


def _op_names(kernel: Kernel) -> list[str]:
    return kernel.name.removesuffix("+...").split("+")


def memory_kind(kernel: Kernel) -> str:
    """The bandwidth class of ``kernel``: ``norm``, ``softmax``, ``activation`` (transcendental math),
    ``pointwise``, ``reduction``, ``copy``, ``gather``, or its category for GEMMs, convs, attention."""
    names = _op_names(kernel)
    if any(name in _NORMS for name in names):
        return "norm"
    if any(name in _SOFTMAX for name in names):
        return "softmax"
    if kernel.category in _MEMORY_KINDS and any(name in _ACTIVATIONS for name in names):
        return "activation"
    return _MEMORY_KINDS.get(kernel.category, kernel.category)


def predicted_group(kernel: Kernel) -> str:
    """The :data:`GROUPS` entry of a predicted kernel."""
    if kernel.category in ("gemm", "qkv-gemm"):
        return "gemm"
    if kernel.category in ("attention", "conv"):
        return kernel.category
    kind = memory_kind(kernel)
    if kind == "norm":
        return "norm"
    return "elementwise" if kind in ("pointwise", "activation", "softmax") else "other"


def measured_group(kernel_name: str) -> str:
    """The :data:`GROUPS` entry of a measured CUDA kernel, from its name."""
    return next((group for group, pattern in _MEASURED if pattern.search(kernel_name)), "other")
