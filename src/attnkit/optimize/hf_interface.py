"""Run transformers models' attention on ``attnkit.ops`` through transformers' own ``AttentionInterface``.

Every transformers model whose attention goes through ``ALL_ATTENTION_FUNCTIONS`` can switch
implementation with ``model.set_attn_implementation(name)``. attnkit registers two names:

- ``"attnkit"``: masks in SDPA form (None when causal-by-flag suffices, else bool, True = attend);
  a call attnkit cannot run exactly falls back to transformers' ``sdpa``;
- ``"attnkit_eager_masks"``: masks in eager form (dense additive float), for models that ran
  ``eager``: a query that may see no key at all (left padding) then averages the values as eager
  does instead of giving zeros; a call attnkit cannot run falls back to the model's own eager code.

The model keeps its own projections, rotary embedding, caches, masks and dropout; only the
``softmax(q k^T * scale + mask) v`` core moves to ``attnkit.ops.attention``, with the exact
semantics of transformers' ``sdpa_attention_forward`` (``is_causal`` only without a mask and for
more than one query, keys cut to the queries at an empty static-cache prefill, T5's position bias
folded into the mask, GQA by head ratio). Keywords attnkit cannot run exactly (``softcap``,
attention sinks, sparse indices, unknown ones with a value) send that call to the fallback,
and :func:`record_calls` says so.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from attnkit.discover.site import SiteRecord
from attnkit.ops import attention, attention_spec, select_backend
from attnkit.ops.masks import permits_everything

__all__ = [
    "ATTNKIT",
    "ATTNKIT_EAGER_MASKS",
    "InterfaceCall",
    "attnkit_attention_forward",
    "attention_modules",
    "backend_of",
    "implementation_for",
    "record_calls",
    "register",
    "set_backend",
]

ATTNKIT = "attnkit"
ATTNKIT_EAGER_MASKS = "attnkit_eager_masks"
_FALLBACK = {ATTNKIT: "sdpa", ATTNKIT_EAGER_MASKS: "eager"}

# Keywords transformers passes that SDPA ignores as well: the mask already encodes them
# (sliding window, packed sequences) or they only steer other kernels.
_IGNORED = frozenset(
    {"sliding_window", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids",
     "deterministic", "use_cache", "cache_position", "output_hidden_states", "return_dict", "layer_idx"}
)  # fmt: skip
# Keywords that change the result and that attnkit.ops cannot compute: the call falls back.
_REFUSED = {
    "softcap": "logit soft-capping (softcap)",
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks",
    "indices": "sparse key indices",
    "block_indices": "sparse key blocks",
    "output_attentions": "output_attentions=True (weights requested)",
}
_HALF = (torch.float16, torch.bfloat16)
_is_compiling = torch.compiler.is_compiling
_BACKEND_ATTRIBUTE = "_attnkit_backend"
"""Per attention module: ``"auto"``, a forced ``attnkit.ops`` backend, or None (module_filter_fn said no)."""


@dataclass(frozen=True)
class InterfaceCall:
    """One call that reached attnkit's attention function (see :func:`record_calls`)."""

    module: nn.Module = field(repr=False, compare=False)
    """The transformers attention module that made the call."""
    ran: str
    """``"attnkit"``, or the transformers implementation it fell back to (``"sdpa"``, ``"eager"``)."""
    backend: str
    """The ``attnkit.ops`` backend (auto's pick or the forced one), or the fallback's name."""
    why: str
    """Auto's rule, ``forced: ...``, or why attnkit did not run this call."""
    rejected: dict[str, str]
    site: SiteRecord
    """The call's shared site record (``path`` is ``""``: the module's path is looked up from ``module``)."""
    dtype: torch.dtype

    @property
    def shape(self) -> str:
        """``B= Hq= Hkv= Sq= Skv= D= dtype mask= causal=`` of the call."""
        return self.site.describe(self.dtype)

    @property
    def dropout_p(self) -> float:
        """The attention-probability dropout the module asked for."""
        return self.site.dropout_p


_RECORDING: contextvars.ContextVar[list[InterfaceCall] | None] = contextvars.ContextVar("attnkit_interface_calls", default=None)


@contextlib.contextmanager
def record_calls() -> Iterator[list[InterfaceCall]]:
    """Collect every call of attnkit's attention function made inside the block (eager mode only).

    Example::

        with record_calls() as calls:
            model(input_ids)
        assert all(call.ran == "attnkit" for call in calls)
    """
    calls: list[InterfaceCall] = []
    token = _RECORDING.set(calls)
    try:
        yield calls
    finally:
        _RECORDING.reset(token)


def _attention_function(implementation: str) -> Callable:
    """The function registered as ``implementation``: transformers' attention-function contract, q
    ``(B, Hq, Sq, D)``, k/v ``(B, Hkv, Skv, D)`` -> ``(out (B, Sq, Hq, Dv), None)`` (see
    ``transformers.integrations.sdpa_attention``). A closure rather than a ``functools.partial``, and
    the common call (no mask, no keywords, not recording) decided in a few reads: a host-bound model
    (BERT-128) issues it once per layer, and every microsecond here is one its forward waits for."""

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, position_bias=None, **kwargs):
        backend = backend_of(module)
        reason = _cannot_run(query, key, attention_mask, backend, kwargs)
        if reason is not None:
            return _fallback(module, implementation, reason, query, key, value, attention_mask, dropout, scaling, is_causal, position_bias, kwargs)
        q_length = query.shape[2]
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        is_causal = bool(is_causal) and q_length > 1 and attention_mask is None
        if is_causal and key.shape[2] > q_length:
            # Prefill with an empty static cache: SDPA's top-left causal mask ignores the empty slots.
            key, value = key[:, :, :q_length], value[:, :, :q_length]
            position_bias = None if position_bias is None else position_bias[..., :q_length]
        mask = None if attention_mask is None else _prepared_mask(attention_mask, query.dtype)
        if position_bias is not None:
            mask = _with_bias(mask, position_bias, key.dtype)
        if not _is_compiling() and _RECORDING.get() is not None:
            _record(module, query, key, value, mask, is_causal, scaling, dropout, backend)
        if mask is not None and mask.requires_grad and query.dtype in _HALF and query.device.type == "cpu" and torch.is_grad_enabled():
            # A learned bias (T5 training) needs a kernel that backpropagates into the mask: on CPU an
            # explicit softmax, which PyTorch's SDPA math kernel runs in fp32 for half inputs; so do we.
            out = attention(query.float(), key.float(), value.float(), mask=mask.float(), causal=is_causal, scale=scaling, dropout_p=float(dropout), backend=backend)
            return out.to(query.dtype).transpose(1, 2).contiguous(), None
        dropout = dropout if type(dropout) is float else float(dropout)
        out = attention(query, key, value, mask=mask, causal=is_causal, scale=scaling, dropout_p=dropout, backend=backend)
        return out.transpose(1, 2).contiguous(), None

    forward.__name__ = forward.__qualname__ = f"{implementation}_attention_forward"
    return forward


_PREPARED = WeakIdKeyDictionary()  # transformers' mask of one forward -> (dtype, version, the mask to run or None)


def _in_dtype(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.is_floating_point() and mask.dtype != dtype:
        # Clamp first: eager's fp32 "masked" value (finfo(float32).min) becomes -inf in half precision,
        # which would turn a fully masked row's average-of-values (eager's result) into zeros.
        return mask.clamp(min=torch.finfo(dtype).min).to(dtype)
    return mask


def _prepared_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The call's mask in the query dtype, or None when it permits every score (bool all True, additive
    all 0: dropping it is exact, and the unmasked kernels are up to 2x faster).

    Done once per mask object: transformers builds one mask per forward and hands it to every layer,
    so the cast and the check (one device sync) run once per forward, not once per layer, also for
    ``inference_mode`` tensors (which ``attnkit.ops`` cannot cache: they have no version counter;
    this object is transformers' own, made for this forward). A mask that changes in place between
    calls is seen through its version counter where it has one. Not while compiling (no sync in a graph).
    """
    if _is_compiling() or mask.requires_grad or mask.numel() == 0:
        return _in_dtype(mask, dtype)
    version = None if mask.is_inference() else mask._version
    entry = _PREPARED.get(mask)
    if entry is None or entry[:2] != (dtype, version):
        converted = _in_dtype(mask, dtype)
        entry = (dtype, version, None if permits_everything(converted) else converted)
        _PREPARED[mask] = entry
    return entry[2]


def _cannot_run(query, key, mask, backend, kwargs) -> str | None:
    """Why attnkit must not run this call (None when it can, exactly)."""
    if backend is None:
        return "module_filter_fn returned False"
    for name, value in kwargs.items():
        if value is None or value is False or name in _IGNORED:
            continue
        return f"{_REFUSED.get(name, f'keyword {name!r}')} is not supported by attnkit.ops"
    q_shape, k_shape = query.shape, key.shape
    if q_shape[0] != k_shape[0]:
        return f"query batch {q_shape[0]} broadcast against key batch {k_shape[0]}"
    if 0 in q_shape or 0 in k_shape:
        return "empty tensor"
    if mask is not None and not isinstance(mask, torch.Tensor):
        return f"mask of type {type(mask).__name__}"
    return None


def _with_bias(mask: torch.Tensor | None, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Fold an additive position bias into the mask as SDPA's ``create_position_bias_mask`` does
    (the causal part stays a flag: attnkit merges it)."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, torch.finfo(dtype).min)
    return bias + mask


def _fallback(module, implementation, reason, query, key, value, attention_mask, dropout, scaling, is_causal, position_bias, kwargs):
    """Run the call on the transformers implementation the model would use without attnkit."""
    name = _FALLBACK[implementation]
    function = _eager_of_class(type(module)) if name == "eager" else None
    if function is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        name, function = "sdpa", ALL_ATTENTION_FUNCTIONS["sdpa"]
    if not _is_compiling() and _RECORDING.get() is not None:
        site = SiteRecord.of_call("", query, key, value, mask=attention_mask, causal=bool(is_causal), scale=scaling, dropout_p=dropout)
        _RECORDING.get().append(InterfaceCall(module, name, name, reason, {}, site, query.dtype))
    extra = dict(kwargs)
    if is_causal is not None:
        extra["is_causal"] = is_causal
    if position_bias is not None:
        extra["position_bias"] = position_bias
    return function(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **extra)


@functools.lru_cache(maxsize=None)
def _eager_of_class(cls: type) -> Callable | None:
    """The ``eager_attention_forward`` of the class's modeling file (what ``eager`` runs)."""
    return getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)


def _record(module, query, key, value, mask, causal, scaling, dropout, backend) -> None:
    spec = attention_spec(query, key, value, mask=mask, causal=causal, scale=scaling, dropout_p=float(dropout))
    if backend == "auto":
        choice = select_backend(spec)
        chosen, why, rejected = choice.chosen, f"auto: {choice.rule}", dict(choice.rejected)
    else:
        chosen, why, rejected = backend, f"forced: backend={backend!r}", {}
    site = SiteRecord.of_call("", query, key, value, mask=mask, causal=causal, scale=scaling, dropout_p=dropout)
    _RECORDING.get().append(InterfaceCall(module, "attnkit", chosen, why, rejected, site, query.dtype))


attnkit_attention_forward = _attention_function(ATTNKIT)
"""The function registered as ``"attnkit"`` (SDPA-form masks, falls back to ``sdpa``)."""
_attnkit_eager_masks_forward = _attention_function(ATTNKIT_EAGER_MASKS)


def register() -> None:
    """Register ``"attnkit"`` and ``"attnkit_eager_masks"`` with transformers' attention and mask
    interfaces (idempotent; done by ``optimize``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(ATTNKIT, attnkit_attention_forward)
    AttentionInterface.register(ATTNKIT_EAGER_MASKS, _attnkit_eager_masks_forward)
    AttentionMaskInterface.register(ATTNKIT, sdpa_mask)
    AttentionMaskInterface.register(ATTNKIT_EAGER_MASKS, eager_mask)


def implementation_for(current: str | None, masks: str) -> str:
    """The attnkit implementation that keeps the masks of ``current`` (``masks="keep"``) or uses
    SDPA-form masks (``masks="sdpa"``)."""
    return ATTNKIT_EAGER_MASKS if (masks == "keep" and current == "eager") else ATTNKIT


@functools.lru_cache(maxsize=None)
def _calls_interface(cls: type) -> bool:
    """Whether ``cls.forward`` dispatches through transformers' ``ALL_ATTENTION_FUNCTIONS``."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def attention_modules(model: nn.Module, configs: list) -> dict[str, nn.Module]:
    """``{path: module}`` of the modules of ``model`` that read one of ``configs`` and call the attention interface."""
    ids = {id(config) for config in configs}
    return {
        path: module
        for path, module in model.named_modules()
        if id(getattr(module, "config", None)) in ids and _calls_interface(type(module))
    }


def backend_of(module: nn.Module) -> str | None:
    """The ``attnkit.ops`` backend of one attention module (``"auto"`` unless set; None: transformers' own)."""
    return module.__dict__.get(_BACKEND_ATTRIBUTE, "auto")


def set_backend(module: nn.Module, backend: str | None) -> None:
    """Choose the ``attnkit.ops`` backend of one attention module (None: keep transformers' own)."""
    module.__dict__[_BACKEND_ATTRIBUTE] = backend
