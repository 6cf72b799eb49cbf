"""Route every ``F.scaled_dot_product_attention`` call of a model through a handler.

This is how validate sees a model's attention calls (their real shapes, masks and dtypes) and
how it forces one backend for the whole model, including backends PyTorch's ``sdpa_kernel``
does not know (``flex``, ``chunked``, a custom kernel):

- HF transformers models loaded with ``attn_implementation="sdpa"`` and most custom models
  call ``torch.nn.functional.scaled_dot_product_attention``; it is patched for the duration.
- ``nn.MultiheadAttention`` calls it from ``F.multi_head_attention_forward`` (looked up in the
  same module namespace), except on its inference fast path, which is a fused C++ op; the
  fast path is turned off for the duration (``torch.backends.mha.set_fastpath_enabled``).
- Layers that write attention as matmul + softmax (HF ``attn_implementation="eager"``,
  ``need_weights=True``) never call SDPA and are not routed; validate says so per layer.

SDPA's ``is_causal`` is top-left aligned; calls are translated to attnkit's bottom-right
convention (an explicit mask when ``Sq != Skv``). Global state is restored in ``finally``.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from attnkit.ops import attention, causal_mask

__all__ = ["SdpaCall", "intercept_sdpa", "force_backend"]

_ORIGINAL_SDPA = F.scaled_dot_product_attention
_state = threading.local()


@dataclass
class SdpaCall:
    """One SDPA call in attnkit's conventions (``mask`` True/additive, causal bottom-right)."""

    q: torch.Tensor  # (B, Hq, Sq, D)
    k: torch.Tensor  # (B, Hkv, Skv, D)
    v: torch.Tensor  # (B, Hkv, Skv, Dv)
    mask: torch.Tensor | None
    causal: bool
    scale: float | None
    dropout_p: float

    @classmethod
    def from_sdpa(cls, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> SdpaCall:
        mask, causal = attn_mask, bool(is_causal)
        seq_q, seq_kv = query.shape[-2], key.shape[-2]
        if causal and seq_q != seq_kv:  # SDPA aligns top-left: key j <= i
            top_left = causal_mask(seq_q, seq_kv, device=query.device, offset=0)
            mask = top_left if mask is None else (mask & top_left if mask.dtype == torch.bool else mask.masked_fill(~top_left, float("-inf")))
            causal = False
        return cls(query, key, value, mask, causal, scale, float(dropout_p))

    def run(self, backend) -> torch.Tensor:
        """Run this call on ``backend``: a name in ``attnkit.ops.BACKENDS`` or a callable like ``attention``."""
        kwargs = dict(mask=self.mask, causal=self.causal, scale=self.scale, dropout_p=self.dropout_p, dropout_mask=None, return_lse=False)
        if callable(backend):
            return backend(self.q, self.k, self.v, **kwargs)
        return attention(self.q, self.k, self.v, backend=backend, **kwargs)


@contextlib.contextmanager
def intercept_sdpa(handler: Callable[[SdpaCall, Callable[..., torch.Tensor]], torch.Tensor]) -> Iterator[None]:
    """Within the block, ``F.scaled_dot_product_attention(...)`` returns ``handler(call, original)``.

    ``original`` is the unpatched SDPA (called with the original arguments it runs the model's
    default). Calls made while a handler runs (a backend that itself uses SDPA) go straight to
    the original, so handlers never recurse.
    """

    def patched(*args, **kwargs):
        original = lambda: _ORIGINAL_SDPA(*args, **kwargs)  # noqa: E731
        query = args[0] if args else kwargs.get("query")
        if getattr(_state, "busy", False) or not isinstance(query, torch.Tensor) or query.dim() != 4:
            return original()  # nested calls, and unbatched 3-D calls, run as they are
        _state.busy = True
        try:
            return handler(SdpaCall.from_sdpa(*args, **kwargs), original)
        finally:
            _state.busy = False

    fastpath = torch.backends.mha.get_fastpath_enabled()
    F.scaled_dot_product_attention = patched
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _ORIGINAL_SDPA
        torch.backends.mha.set_fastpath_enabled(fastpath)


def force_backend(backend) -> contextlib.AbstractContextManager:
    """Run every SDPA call of the block on ``backend`` (a name in ``BACKENDS`` or a callable)."""
    return intercept_sdpa(lambda call, original: call.run(backend))
