"""The op's one cache: what ``attention()`` remembers between calls, and ``clear_caches()``.

Remembered (each store registers here, so one call forgets all of them):

* the per-call memo (``ops/calls.py``): checks and backend choice per call key;
* auto's choice per spec and the kernels' run-time refusals (``ops/auto.py``, ``ops/registry.py``);
* per-mask work (:func:`per_mask`): a mask merged with causality, its empty-row check, a
  FlexAttention block mask — built once per mask object (and its in-place version), so the 12
  layers of a model that share one padding mask build them once per forward, not 12 times;
* shape-keyed helpers (the causal block mask of a sequence length, the compiled FlexAttention).

Call ``clear_caches()`` after editing ``RULES`` or ``BACKENDS`` by hand (``register_backend`` does it).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["clear_caches", "on_clear", "per_mask"]

_CLEARS: list[Callable[[], None]] = []
_PER_MASK = WeakIdKeyDictionary()  # mask object -> (its _version, {key: derived})
_is_compiling = torch.compiler.is_compiling


def on_clear(clear: Callable[[], None]) -> Callable[[], None]:
    """Register a store's ``clear`` with :func:`clear_caches`; returns it (usable as a decorator)."""
    _CLEARS.append(clear)
    return clear


def clear_caches() -> None:
    """Forget everything the op remembers (memo, choices, run-time refusals, per-mask work)."""
    _PER_MASK.clear()
    for clear in _CLEARS:
        clear()


def _is_inference(mask: Any) -> bool:
    """Inference-mode tensors have no version counter, so an in-place edit could not be seen: not cached."""
    return isinstance(mask, torch.Tensor) and mask.is_inference()


def per_mask(mask: Any, key: Hashable, build: Callable[[], Any]) -> Any:
    """``build()`` once per ``(mask object, key)``; rebuilt after an in-place change to the mask.

    Not cached (built every call) while tracing, when the mask needs a gradient (the result
    would hold a stale autograd graph), or for inference-mode tensors (no version counter).
    """
    if _is_compiling() or getattr(mask, "requires_grad", False) or _is_inference(mask):
        return build()
    version = getattr(mask, "_version", 0)  # tensors count in-place writes; other masks are immutable
    entry = _PER_MASK.get(mask)
    if entry is None or entry[0] != version:
        entry = (version, {})
        _PER_MASK[mask] = entry
    derived = entry[1]
    if key not in derived:
        derived[key] = build()
    return derived[key]
