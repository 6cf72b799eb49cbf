"""The attention backends by name, which of them can run a call and why not, and ``register_backend``.

A backend is a ``run(q, k, v, options: AttentionOptions) -> (out, lse | None)`` function (``options.scale``
already resolved) plus a ``support(spec) -> str | None`` rule returning the concrete reason it cannot
serve a call. The support rule is checked before ``run`` is ever called. New capabilities (ring,
sparse, FP8 attention) plug in with :func:`register_backend`; ``auto`` considers a backend only if
it opted in (``auto=True``), so registering one never changes what existing calls run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from attnkit.errors import check_type, fail
from attnkit.ops.cache import clear_caches, on_clear
from attnkit.ops.calls import forget_calls
from attnkit.ops.chunked import chunked_attention
from attnkit.ops.flex import flex_attention, flex_support
from attnkit.ops.options import AttentionOptions
from attnkit.ops.reference import explicit_attention, reference_attention
from attnkit.ops.sdpa import (
    cudnn_attention,
    cudnn_plan,
    cudnn_support,
    efficient_attention,
    efficient_plan,
    efficient_support,
    flash_attention,
    flash_plan,
    flash_support,
)
from attnkit.ops.spec import AttentionSpec

__all__ = [
    "Backend",
    "BACKENDS",
    "register_backend",
    "unregister_backend",
    "backend_support",
    "get_backend",
    "record_runtime_rejection",
    "runtime_rejections",
]

RunFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionOptions], "tuple[torch.Tensor, torch.Tensor | None]"]
SupportFn = Callable[[AttentionSpec], "str | None"]


def _always(spec: AttentionSpec) -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One way to compute attention."""

    name: str
    summary: str
    fn: RunFn
    """``fn(q, k, v, options) -> (out, lse | None)``; ``options.scale`` is resolved (not None)."""
    support: SupportFn
    """None if the backend can run a call described by the spec, else why not."""
    auto: bool = False
    """Whether ``backend="auto"`` may choose it."""
    plan: Callable[[AttentionSpec], "RunFn | None"] | None = None
    """Optional: a run specialised for calls of one spec (decisions taken once; ``attention()`` keeps
    it per call key), or None from it to use ``fn``."""

    def run(self, q, k, v, options: AttentionOptions | None = None, **keywords):
        """Run on ``options`` (or ``attention()``'s keywords, for callers written before ``AttentionOptions``)."""
        if options is None:
            options = AttentionOptions(**keywords)
        if options.scale is None:
            options = AttentionOptions(**{**vars(options), "scale": q.shape[-1] ** -0.5})
        return self.fn(q, k, v, options)

    def __repr__(self) -> str:
        return f"Backend({self.name!r}: {self.summary}{', auto' if self.auto else ''})"


def _registry() -> dict[str, Backend]:
    backends = [
        Backend("reference", "explicit softmax in float64; the ground truth", reference_attention, _always),
        Backend("math", "explicit softmax in the input dtype (SDPA's math algorithm)", explicit_attention, _always, auto=True),
        Backend("flash", "FlashAttention kernel (CUDA, and the CPU flash kernel); lse on CUDA", flash_attention, flash_support, True, flash_plan),
        Backend("cudnn", "cuDNN attention kernel (CUDA); lse", cudnn_attention, cudnn_support, True, cudnn_plan),
        Backend("efficient", "memory-efficient attention kernel (CUDA); lse", efficient_attention, efficient_support, True, efficient_plan),
        Backend("flex", "FlexAttention with a block mask (compiled on CUDA, eager on CPU)", flex_attention, flex_support, auto=True),
        Backend("chunked", "KV blocks merged through the lse in plain PyTorch (ring attention in one process); returns lse", chunked_attention, _always, auto=True),
    ]
    return {backend.name: backend for backend in backends}


BACKENDS: dict[str, Backend] = _registry()
_BUILT_IN = frozenset(BACKENDS)


def register_backend(name: str, support_fn: SupportFn, run_fn: RunFn, *, auto: bool = False, summary: str = "", replace: bool = False) -> Backend:
    """Add a backend that ``attention(..., backend=name)``, ``validate`` and ``bench`` can use.

    Args:
        name: the backend's name (not ``"auto"``).
        support_fn: ``support_fn(spec: AttentionSpec) -> None | str``; the reason it cannot run a call.
        run_fn: ``run_fn(q, k, v, options: AttentionOptions) -> (out, lse | None)``; ``options.scale`` is
            resolved; ``lse`` (``(B, Hq, Sq)`` float32) is required when ``options.return_lse``.
        auto: let ``backend="auto"`` choose it (after the ordered backends of the matching rule).
        summary: one line for listings.
        replace: allow replacing a registered backend of the same name (not a built-in one).

    Returns the registered :class:`Backend`. Clears the op's caches (auto's choices may change).

    Example::

        register_backend("ring", ring_support, ring_run, summary="ring attention over the default group")
        attention(q, k, v, backend="ring")
    """
    check_type(name, str, "name")
    if not (name != "auto" and name):
        fail("name", "a non-empty backend name other than 'auto'", name)
    if not (name not in BACKENDS or (replace and name not in _BUILT_IN)):
        fail("name", f"a name not yet registered (registered: {sorted(BACKENDS)})", name, "Pass replace=True to replace your own backend.")
    for parameter, fn in (("support_fn", support_fn), ("run_fn", run_fn)):
        if not callable(fn):
            fail(parameter, "a callable", fn)
    backend = Backend(name, summary or getattr(run_fn, "__doc__", None) or name, run_fn, support_fn, auto=bool(auto))
    BACKENDS[name] = backend
    clear_caches()
    return backend


def unregister_backend(name: str) -> None:
    """Remove a backend added with :func:`register_backend` (built-in ones stay)."""
    if not (name in BACKENDS and name not in _BUILT_IN):
        fail("name", f"a backend added with register_backend ({sorted(set(BACKENDS) - _BUILT_IN)})", name)
    del BACKENDS[name]
    clear_caches()


# Refusals the static rules missed (a kernel said no at run time): per (backend, spec, layout), so an
# odd call (strided, misaligned) does not change what other calls of the same shape run. layout None
# = every layout of the spec.
_RUNTIME_REJECTIONS: dict[tuple[str, AttentionSpec, Hashable], str] = {}
on_clear(_RUNTIME_REJECTIONS.clear)


def record_runtime_rejection(name: str, spec: AttentionSpec, reason: str, layout: Hashable = None) -> None:
    """Remember that backend ``name`` refused ``spec`` (with ``layout``: only calls of that layout) at run time."""
    _RUNTIME_REJECTIONS[(name, spec, layout)] = reason
    forget_calls()


def runtime_rejections(spec: AttentionSpec, layout: Hashable = None) -> dict[str, str]:
    """Backend -> why it refused at run time, for ``spec`` in general and for this ``layout``."""
    found = {}
    for (name, rejected, where), reason in _RUNTIME_REJECTIONS.items():
        if rejected == spec and where in (None, layout):
            found[name] = reason
    return found


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises ``InvalidArgumentError`` for an unknown name."""
    if name not in BACKENDS:
        fail("backend", f"'auto' or one of {sorted(BACKENDS)}", name)
    return BACKENDS[name]


def backend_support(spec: AttentionSpec, layout: Hashable = None) -> dict[str, str | None]:
    """For every registered backend: None if it can run ``spec``, else the reason it cannot."""
    refused = runtime_rejections(spec, layout) if _RUNTIME_REJECTIONS else {}
    return {name: backend.support(spec) or refused.get(name) for name, backend in BACKENDS.items()}
