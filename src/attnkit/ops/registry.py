"""The attention backends by name, and for a call which of them can run it and why not.

Each backend is a ``run`` function with the signature of ``explicit_attention`` (returning
``(out, lse | None)``) plus a ``support(spec)`` rule that returns None or the concrete reason it
cannot serve the call. The support rule is checked before ``run`` is ever called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from attnkit.errors import fail
from attnkit.ops.calls import forget_calls
from attnkit.ops.chunked import chunked_attention
from attnkit.ops.flex import flex_attention, flex_support
from attnkit.ops.reference import explicit_attention, reference_attention
from attnkit.ops.sdpa import cudnn_attention, cudnn_support, efficient_attention, efficient_support, flash_attention, flash_support
from attnkit.ops.spec import AttentionSpec

__all__ = ["Backend", "BACKENDS", "backend_support", "get_backend", "record_runtime_rejection"]

RunFn = Callable[..., "tuple[torch.Tensor, torch.Tensor | None]"]
SupportFn = Callable[[AttentionSpec], "str | None"]


def _always(spec: AttentionSpec) -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One way to compute attention."""

    name: str
    summary: str
    run: RunFn
    support: SupportFn

    def __repr__(self) -> str:
        return f"Backend({self.name!r}: {self.summary})"


def _registry() -> dict[str, Backend]:
    backends = [
        Backend("reference", "explicit softmax in float64; the ground truth", reference_attention, _always),
        Backend("math", "explicit softmax in the input dtype (SDPA's math algorithm)", explicit_attention, _always),
        Backend("flash", "SDPA FlashAttention kernel (CUDA, and the CPU flash kernel)", flash_attention, flash_support),
        Backend("cudnn", "SDPA cuDNN kernel (CUDA)", cudnn_attention, cudnn_support),
        Backend("efficient", "SDPA memory-efficient kernel (CUDA)", efficient_attention, efficient_support),
        Backend("flex", "FlexAttention with a block mask (compiled on CUDA, eager on CPU)", flex_attention, flex_support),
        Backend("chunked", "online softmax over KV blocks in plain PyTorch; returns lse", chunked_attention, _always),
    ]
    return {backend.name: backend for backend in backends}


BACKENDS: dict[str, Backend] = _registry()
# Refusals the static rules missed (a kernel said no at run time), remembered per call shape
# so that auto does not retry them and backend_support reports them.
_RUNTIME_REJECTIONS: dict[tuple[str, AttentionSpec], str] = {}


def record_runtime_rejection(name: str, spec: AttentionSpec, reason: str) -> None:
    """Remember that backend ``name`` refused ``spec`` when it ran (``attention()``'s memo forgets its choices)."""
    _RUNTIME_REJECTIONS[(name, spec)] = reason
    forget_calls()


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises ``InvalidArgumentError`` for an unknown name."""
    if name not in BACKENDS:
        fail("backend", f"'auto' or one of {sorted(BACKENDS)}", name)
    return BACKENDS[name]


def backend_support(spec: AttentionSpec) -> dict[str, str | None]:
    """For every backend: None if it can run ``spec``, else the reason it cannot."""
    return {name: backend.support(spec) or _RUNTIME_REJECTIONS.get((name, spec)) for name, backend in BACKENDS.items()}
