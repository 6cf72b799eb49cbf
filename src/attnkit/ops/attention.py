"""The public ``attention()`` op: check inputs, pick a backend, run it."""

from __future__ import annotations

import math

import torch

from attnkit.errors import UnsupportedError, check_type
from attnkit.ops.auto import select_backend
from attnkit.ops.inputs import attention_spec
from attnkit.ops.registry import BACKENDS, backend_support, get_backend, record_runtime_rejection

__all__ = ["attention"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact scaled dot-product attention, ``softmax(q k^T * scale + mask) v``, on a chosen backend.

    Args:
        q: ``(B, Hq, Sq, D)``.
        k: ``(B, Hkv, Skv, D)`` with ``Hq % Hkv == 0``; query head ``h`` uses KV head
            ``h // (Hq // Hkv)`` (GQA; MQA when ``Hkv == 1``).
        v: ``(B, Hkv, Skv, Dv)``.
        mask: bool (True = may attend) or floating (added to the scores), broadcastable to
            ``(B, Hq, Sq, Skv)``.
        causal: bottom-right aligned, query ``i`` sees key ``j`` iff ``j <= i + Skv - Sq``::

                Sq=2, Skv=4:  k0 k1 k2 k3
                         q0:   x  x  x  .
                         q1:   x  x  x  x

        scale: multiplies ``q k^T``; default ``1/sqrt(D)``.
        dropout_p: dropout on the attention probabilities (kept ones scaled by ``1/(1-p)``).
        dropout_mask: bool, broadcastable to ``(B, Hq, Sq, Skv)``, True = keep; makes dropout reproducible.
        return_lse: also return the natural-log log-sum-exp of the scaled, masked scores.
        backend: ``"auto"`` or a name in ``BACKENDS`` (``reference``, ``math``, ``flash``,
            ``cudnn``, ``efficient``, ``flex``, ``chunked``).

    Returns:
        ``out (B, Hq, Sq, Dv)`` in q's dtype, and with ``return_lse`` also ``lse (B, Hq, Sq)`` float32.
        A query with no allowed key gets zeros and ``lse = -inf``.

    Raises:
        InvalidArgumentError / InvalidTypeError: malformed inputs or unknown backend.
        UnsupportedError: the forced backend cannot serve these inputs (the message says why).

    Example::

        out = attention(q, k, v, causal=True)                    # fastest backend that fits
        out, lse = attention(q, k, v, backend="chunked", return_lse=True)
    """
    spec = attention_spec(
        q, k, v, mask=mask, causal=causal, scale=scale, dropout_p=dropout_p, dropout_mask=dropout_mask, return_lse=return_lse
    )
    check_type(backend, str, "backend")
    options = dict(
        mask=mask,
        causal=causal,
        scale=scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]),
        dropout_p=float(dropout_p),
        dropout_mask=dropout_mask,
        return_lse=return_lse,
    )
    if backend != "auto":
        reason = get_backend(backend).support(spec)
        if reason is not None:
            usable = [name for name, why in backend_support(spec).items() if why is None]
            raise UnsupportedError(f"backend {backend!r} cannot run this call: {reason}. Usable here: {', '.join(usable)}.")
        out, lse = BACKENDS[backend].run(q, k, v, **options)
    else:
        out, lse = _run_auto(spec, q, k, v, options)
    return (out, lse) if return_lse else out


def _run_auto(spec, q, k, v, options):
    """Run the backend auto picks; if its kernel refuses at run time, remember that and take the next."""
    while True:
        name = select_backend(spec).chosen
        try:
            return BACKENDS[name].run(q, k, v, **options)
        except UnsupportedError as error:
            record_runtime_rejection(name, spec, str(error))
            select_backend.cache_clear()
