"""Runtime attention discovery: every ``F.scaled_dot_product_attention`` call a model makes, however it was bound.

A :class:`torch.overrides.TorchFunctionMode` sees each call through torch's own function dispatch, so it
finds ``from torch.nn.functional import scaled_dot_product_attention as sdpa`` bound at import time,
``torch._C._nn`` calls and the SDPA inside ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``)
alike, and patches nothing: the mode is thread-local and leaves the stack when the block ends, also on error.
While it is active ``nn.MultiheadAttention`` leaves its fused inference fast path by itself (its inputs
"have a torch function"), so no global flag is flipped.

Not seen: attention written as matmul + softmax (HF ``attn_implementation="eager"``, ``need_weights=True``),
which never calls SDPA (:func:`attnkit.discover.find_attention` finds it on a captured graph), and
``attnkit.ops.attention``, which calls ATen kernels directly.

SDPA's ``is_causal`` is top-left aligned; calls are translated to attnkit's bottom-right convention (an
explicit mask when ``Sq != Skv``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from attnkit.discover.site import SiteRecord
from attnkit.ops import attention, causal_mask

__all__ = ["AttentionCall", "AttentionInterceptor", "intercept_attention"]

_SDPA = torch._C._nn.scaled_dot_product_attention
_COMPOSITES = frozenset({F.multi_head_attention_forward})
"""Python functions that call SDPA inside: their bodies run under the mode (one dispatch hop skipped)."""
_REDISPATCH = getattr(torch.overrides, "redispatch_function", None)
"""Skips one dispatch hop, keeping the mode for the body; new in recent torch (absent in 2.5)."""


@dataclass
class AttentionCall:
    """One SDPA call in attnkit's conventions (``mask`` True/additive, causal bottom-right): the tensors;
    :meth:`site` gives its :class:`~attnkit.discover.site.SiteRecord`."""

    q: torch.Tensor  # (B, Hq, Sq, D)
    k: torch.Tensor  # (B, Hkv, Skv, D)
    v: torch.Tensor  # (B, Hkv, Skv, Dv)
    mask: torch.Tensor | None
    causal: bool
    scale: float | None
    dropout_p: float

    @classmethod
    def from_sdpa(cls, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False) -> AttentionCall:
        mask, causal = attn_mask, bool(is_causal)
        seq_q, seq_kv = query.shape[-2], key.shape[-2]
        if causal and seq_q != seq_kv:  # SDPA aligns top-left: key j <= i
            top_left = causal_mask(seq_q, seq_kv, device=query.device, offset=0)
            mask = top_left if mask is None else (
                mask & top_left if mask.dtype == torch.bool else mask.masked_fill(~top_left, float("-inf")))
            causal = False
        return cls(query, key, value, mask, causal, scale, float(dropout_p))

    def site(self, path: str) -> SiteRecord:
        """The shared site record of this call, made by the module at ``path``."""
        return SiteRecord.of_call(path, self.q, self.k, self.v, mask=self.mask, causal=self.causal, scale=self.scale,
                                  dropout_p=self.dropout_p)

    def run(self, backend) -> torch.Tensor:
        """Run this call on ``backend``: a name in ``attnkit.ops.BACKENDS`` or a callable like ``attention``."""
        kwargs = dict(mask=self.mask, causal=self.causal, scale=self.scale, dropout_p=self.dropout_p,
                      dropout_mask=None, return_lse=False)
        if callable(backend):
            return backend(self.q, self.k, self.v, **kwargs)
        return attention(self.q, self.k, self.v, backend=backend, **kwargs)


Handler = Callable[[AttentionCall, Callable[[], torch.Tensor]], torch.Tensor]
"""``handler(call, original) -> output``; ``original()`` runs the SDPA call as the model made it."""


class AttentionInterceptor(TorchFunctionMode):
    """The mode behind :func:`intercept_attention`; ``unrouted`` names composite calls it could not enter."""

    def __init__(self, handler: Handler):
        super().__init__()
        self.handler = handler
        self.unrouted: list[str] = []
        """Functions (e.g. ``multi_head_attention_forward``) whose inner SDPA ran unseen: this torch lacks
        ``torch.overrides.redispatch_function``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            query = args[0] if args else kwargs.get("query")
            if isinstance(query, torch.Tensor) and query.dim() == 4:  # unbatched 3-D calls run as they are
                # The mode is off while the handler runs: SDPA calls inside a backend go straight through.
                return self.handler(AttentionCall.from_sdpa(*args, **kwargs), lambda: func(*args, **kwargs))
        elif func in _COMPOSITES:
            if _REDISPATCH is not None:
                with self:
                    return _REDISPATCH(func, types, args, kwargs)
            self.unrouted.append(func.__name__)
        return func(*args, **kwargs)


def intercept_attention(handler: Handler) -> AttentionInterceptor:
    """Within the ``with`` block, every batched (4-D) SDPA call returns ``handler(call, original)``.

    Example::

        calls = []
        with intercept_attention(lambda call, original: calls.append(call) or original()):
            model(x)
    """
    return AttentionInterceptor(handler)
