"""The memo behind ``attention()``'s fast path: checks and backend choice, remembered per call key.

Whether a call is valid (``attention_spec``) and which backend runs it (``select_backend`` or the
forced backend's support rule) depend only on what :func:`call_key` collects: the tensors' types,
shapes, strides, dtypes, devices and ``requires_grad``; the mask's and the dropout mask's shape,
dtype and device (and the mask's ``requires_grad``; a ``BlockMask``'s shape and block size);
``causal``, ``scale``, ``dropout_p``, ``return_lse``, the positions ``q_start``/``kv_start``, the
backend name and ``torch.is_grad_enabled()``. Strides are in the key because a kernel may refuse
one layout at run time (auto then remembers that for the layout only, see ``registry``). Building
the key is a few attribute reads, so a repeated call skips the checks and the selection. Only
calls that passed every check and ran are remembered: a bad call is never in the memo, and always
gets the full checks and their error.

No key (so the full path) when:

* tracing (``torch.compile``, ``torch.export``): shapes may be symbolic, and the traced graph
  must not depend on Python-side state;
* a tensor is not a plain ``torch.Tensor`` (FakeTensor, DTensor, other subclasses) or a scalar
  option is not exactly a ``bool``/``int``/``float``/``str`` (``causal=1`` or ``dropout_p=True``
  must reach the type checks, and ``1 == True`` as a dict key);
* the mask is a sparsity pattern object (its ``block_mask(...)`` result is cached per object instead).

The memo is bounded (:data:`MAX_CALLS` keys, least recently used first out; a hit reorders it only once
the memo is half full, where eviction comes into sight) and is cleared with
``select_backend.cache_clear()`` and by ``registry.record_runtime_rejection``, i.e. whenever
what auto would choose may have changed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch

from attnkit.ops.cache import on_clear
from attnkit.ops.options import _BlockMask
from attnkit.ops.spec import AttentionSpec

__all__ = ["KnownCall", "CALLS", "MAX_CALLS", "call_key", "remember", "forget_calls"]

MAX_CALLS = 4096
"""Distinct call keys remembered; a model has a handful (one per layer shape and mode)."""

_TENSOR = torch.Tensor
_MASK_TYPES = (torch.Tensor, torch.nn.Parameter)  # a learned additive bias may be a Parameter
_NUMBER = (float, int)  # exact types: bool is an int and must reach the type checks
_is_compiling = torch.compiler.is_compiling
_is_grad_enabled = torch.is_grad_enabled


class KnownCall(NamedTuple):
    """What the full path worked out for a call key."""

    spec: AttentionSpec
    backend: str
    """The backend that ran (auto: its choice; else the forced name)."""
    default_scale: float | None
    """``1/sqrt(D)`` when the call passed no scale, else None (the caller's scale is used)."""
    layout: tuple | None = None
    """The tensors' strides (what a run-time refusal is remembered for)."""
    run: object = None
    """``run(q, k, v, options) -> (out, lse | None)`` for this key: the backend's plan or its ``fn``."""
    options: object = None
    """The call's ``AttentionOptions`` when no tensor option (mask, dropout mask) varies between calls."""


CALLS: OrderedDict[tuple, KnownCall] = OrderedDict()


def call_key(q, k, v, mask, causal, scale, dropout_p, dropout_mask, return_lse, backend, q_start=None, kv_start=None) -> tuple | None:
    """The memo key of an ``attention()`` call, or None when the call must take the full path."""
    if (
        type(q) is not _TENSOR
        or type(k) is not _TENSOR
        or type(v) is not _TENSOR
        or type(causal) is not bool
        or type(return_lse) is not bool
        or type(backend) is not str
        or type(dropout_p) not in _NUMBER
        or (scale is not None and type(scale) not in _NUMBER)
        or (q_start is not None and type(q_start) is not int)
        or (kv_start is not None and type(kv_start) is not int)
        or _is_compiling()
    ):
        return None
    if mask is None:
        mask_key = None
    elif type(mask) in _MASK_TYPES:
        mask_key = (mask.shape, mask.dtype, mask.device, mask.requires_grad, mask.stride())
    elif _BlockMask is not None and type(mask) is _BlockMask:
        mask_key = (_BlockMask, tuple(mask.shape), mask.BLOCK_SIZE, mask.kv_num_blocks.device)
    else:
        return None
    if dropout_mask is None:
        dropout_key = None
    elif type(dropout_mask) is _TENSOR:
        dropout_key = (dropout_mask.shape, dropout_mask.dtype, dropout_mask.device)
    else:
        return None
    # fmt: off
    return (
        q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype,
        q.device, k.device, v.device, q.requires_grad, k.requires_grad, v.requires_grad, mask_key,
        dropout_key, causal, scale, dropout_p, return_lse, q_start, kv_start, backend, _is_grad_enabled(),
    )
    # fmt: on


def remember(key: tuple, known: KnownCall) -> None:
    """Store a call that passed every check; evict the least recently used key past ``MAX_CALLS``."""
    CALLS[key] = known
    CALLS.move_to_end(key)
    if len(CALLS) > MAX_CALLS:
        CALLS.popitem(last=False)


@on_clear
def forget_calls() -> None:
    """Drop every remembered call (the backend choices may have changed)."""
    CALLS.clear()
