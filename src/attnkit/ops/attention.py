"""The public ops: ``attention()`` (check inputs, pick a backend, run it) and ``attention_weights()``.

Checking a call and choosing its backend cost more than a small kernel, so ``attention()``
remembers both per call key (``ops/calls.py``): a repeated call builds the key, finds it and goes
straight to the backend; every new key takes the full path first.
"""

from __future__ import annotations

import math

import torch

from attnkit.errors import UnsupportedError, check_type, fail
from attnkit.ops.auto import select_backend
from attnkit.ops.cache import per_mask
from attnkit.ops import calls as _calls
from attnkit.ops.calls import CALLS, KnownCall, call_key, remember
from attnkit.ops.inputs import attention_spec, resolve_block_pattern
from attnkit.ops.masks import permits_everything
from attnkit.ops.options import AttentionOptions, _BlockMask
from attnkit.ops.reference import explicit_weights
from attnkit.ops.registry import BACKENDS, backend_support, get_backend, record_runtime_rejection

__all__ = ["attention", "attention_weights"]

_TENSOR = torch.Tensor


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask=None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    q_start: int | None = None,
    kv_start: int | None = None,
    options: AttentionOptions | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact scaled dot-product attention, ``softmax(q k^T * scale + mask) v``, on a chosen backend.

    Args:
        q: ``(B, Hq, Sq, D)``; ``B`` may be 0 (an empty output comes back).
        k: ``(B, Hkv, Skv, D)`` with ``Hq % Hkv == 0``; query head ``h`` uses KV head
            ``h // (Hq // Hkv)`` (GQA; MQA when ``Hkv == 1``).
        v: ``(B, Hkv, Skv, Dv)``.
        mask: bool (True = may attend) or floating (added to the scores), broadcastable to
            ``(B, Hq, Sq, Skv)``; or a FlexAttention ``BlockMask`` (or a pattern object with
            ``block_mask(batch, heads, seq_q, seq_kv, device)``), with ``causal=False``.
        causal: bottom-right aligned, query ``i`` sees key ``j`` iff ``j <= i + Skv - Sq``::

                Sq=2, Skv=4:  k0 k1 k2 k3
                         q0:   x  x  x  .
                         q1:   x  x  x  x

        scale: multiplies ``q k^T``; default ``1/sqrt(D)``.
        dropout_p: dropout on the attention probabilities (kept ones scaled by ``1/(1-p)``).
        dropout_mask: bool, broadcastable to ``(B, Hq, Sq, Skv)``, True = keep; makes dropout reproducible.
        return_lse: also return the natural-log log-sum-exp of the scaled, masked scores.
        backend: ``"auto"`` or a name in ``BACKENDS`` (``reference``, ``math``, ``flash``,
            ``cudnn``, ``efficient``, ``flex``, ``chunked``, and any added with ``register_backend``).
        q_start, kv_start: global positions of query row 0 and key 0 for a sequence shard: query
            ``q_start + i`` sees key ``kv_start + j`` iff ``kv_start + j <= q_start + i`` (with ``causal``).
        options: an :class:`AttentionOptions` instead of the keywords above (not both).

    Returns:
        ``out (B, Hq, Sq, Dv)`` in q's dtype, and with ``return_lse`` also ``lse (B, Hq, Sq)`` float32.
        A query with no allowed key gets zeros and ``lse = -inf``; a query holding NaN gets NaN.

    Raises:
        InvalidArgumentError / InvalidTypeError: malformed inputs or unknown backend.
        UnsupportedError: the forced backend cannot serve these inputs (the message says why).

    Example::

        out = attention(q, k, v, causal=True)                    # fastest backend that fits
        out, lse = attention(q, k, v, backend="chunked", return_lse=True)
        out = attention(q_shard, k_shard, v_shard, causal=True, q_start=4096, kv_start=0)
    """
    if options is not None:
        if not (mask is None and causal is False and scale is None and dropout_p == 0.0 and dropout_mask is None
                and return_lse is False and q_start is None and kv_start is None):  # fmt: skip
            fail("options", "either options or the loose keywords (mask, causal, ...), not both", options)
        check_type(options, AttentionOptions, "options")
        mask, causal, scale, dropout_p = options.mask, options.causal, options.scale, options.dropout_p
        dropout_mask, return_lse, q_start, kv_start = options.dropout_mask, options.return_lse, options.q_start, options.kv_start
    if isinstance(mask, _TENSOR) and _well_formed(mask, q, k) and _allows_everything(mask):
        mask = None  # exact, and it opens the unmasked kernels (cuDNN, flash) to the call
    key = call_key(q, k, v, mask, causal, scale, dropout_p, dropout_mask, return_lse, backend, q_start, kv_start)
    known = CALLS.get(key) if key is not None else None
    fresh = known is None and key is not None  # remember it once it has run
    if known is None:
        known = _check(q, k, v, mask, causal, scale, dropout_p, dropout_mask, return_lse, backend, q_start, kv_start)
    elif len(CALLS) > _calls.MAX_CALLS // 2:
        # Least recently used goes first. Recency matters only near eviction, so the reordering (a second
        # hash of the key, ~0.4 µs of a ~20 µs call) waits until the memo is half full: by the time it is
        # full, every key used since then has been moved behind the ones that were not.
        try:
            CALLS.move_to_end(key)
        except KeyError:  # another thread cleared the memo in between; `known` is still right
            pass
    run_options = known.options
    if run_options is None:
        pattern = None
        if mask is not None and not isinstance(mask, _TENSOR):
            pattern = None if _BlockMask is not None and isinstance(mask, _BlockMask) else mask
            mask = resolve_block_pattern(mask, q, k)  # a pattern's BlockMask, once per pattern object
        run_options = AttentionOptions(
            mask, causal, known.default_scale if scale is None else scale, float(dropout_p), dropout_mask, return_lse, q_start, kv_start, pattern
        )
        if fresh and mask is None and dropout_mask is None:
            known = known._replace(options=run_options)  # everything in it is in the key
    if known.spec.batch == 0:
        out, lse = _empty(q, v)
    elif backend == "auto":
        try:  # the hot path: auto's remembered choice (one frame less than going through _after_refusal)
            out, lse = known.run(q, k, v, run_options)
        except UnsupportedError as error:  # its kernel refused at run time (the memo gets cleared)
            ran, (out, lse) = _after_refusal(known, error, q, k, v, run_options)
            known, fresh = known._replace(backend=ran, run=_runner(ran, known.spec)), key is not None
    else:
        out, lse = known.run(q, k, v, run_options)
    if fresh:
        remember(key, known)
    return (out, lse) if return_lse else out


def _well_formed(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> bool:
    """A mask the full checks would accept (bool or floating, q's device, broadcastable to (B, Hq, Sq, Skv)),
    so dropping an all-permitting one can never hide a user's mistake from ``attention_spec``."""
    if not (mask.dtype == torch.bool or mask.is_floating_point()) or mask.device != q.device or mask.dim() > 4:
        return False
    if q.dim() != 4 or k.dim() != 4:
        return False
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return all(size in (1, want) for size, want in zip(reversed(mask.shape), reversed(target)))


def _allows_everything(mask: torch.Tensor) -> bool:
    """Whether a tensor mask permits every score unchanged (bool all True, additive all 0).

    Models hand such masks over whenever a batch has no padding (transformers' eager masks, HF models
    switched to attnkit from eager); dropping them is exact and turns the masked kernel (SDPA's
    efficient path on CUDA, 2x slower than cuDNN at BERT's shapes) into the unmasked one. The check
    costs one pass and one device sync per mask object (``per_mask``; the layers of a forward share
    one mask), as transformers' own SDPA path does; skipped while compiling (no sync in a graph), for
    masks that need a gradient and for ``inference_mode`` tensors (no version counter, so no cache:
    the sync would come back on every call; transformers models get the check once per forward from
    ``optimize``'s attention interface instead).
    """
    if mask.requires_grad or torch.compiler.is_compiling() or mask.numel() == 0 or mask.is_inference():
        return False
    return per_mask(mask, "allows-everything", lambda: permits_everything(mask))


def _check(q, k, v, mask, causal, scale, dropout_p, dropout_mask, return_lse, backend, q_start, kv_start) -> KnownCall:
    """The full path: every check (raising the user's error), then the backend to run."""
    spec = attention_spec(
        q, k, v, mask=mask, causal=causal, scale=scale, dropout_p=dropout_p, dropout_mask=dropout_mask,
        return_lse=return_lse, q_start=q_start, kv_start=kv_start,
    )  # fmt: skip
    check_type(backend, str, "backend")
    layout = (q.stride(), k.stride(), v.stride())
    if backend == "auto":
        name = select_backend(spec, layout).chosen
    else:
        reason = get_backend(backend).support(spec)
        if reason is not None:
            usable = [name for name, why in backend_support(spec).items() if why is None]
            raise UnsupportedError(f"backend {backend!r} cannot run this call: {reason}. Usable here: {', '.join(usable)}.")
        name = backend
    return KnownCall(spec, name, 1.0 / math.sqrt(q.shape[-1]) if scale is None else None, layout, _runner(name, spec))


def _runner(name: str, spec):
    """The backend's plan for this spec, or its general ``fn``."""
    backend = BACKENDS[name]
    return (backend.plan(spec) if backend.plan is not None else None) or backend.fn


def _empty(q, v):
    """An empty batch: nothing to compute (kernels differ on zero-size launches)."""
    out = q.new_zeros(*q.shape[:3], v.shape[-1]) + (q.sum() + v.sum()) * 0  # keeps the autograd link
    return out, torch.zeros(q.shape[:3], device=q.device)


def _after_refusal(known: KnownCall, error: UnsupportedError, q, k, v, options: AttentionOptions):
    """Auto's choice ``known.backend`` refused this call at run time with ``error``: remember that for this
    call's layout only and run the next choice (and so on). Returns ``(backend that ran, (out, lse))``."""
    name = known.backend
    while True:
        record_runtime_rejection(name, known.spec, str(error), known.layout)
        select_backend.cache_clear()
        name = select_backend(known.spec, known.layout).chosen
        try:
            return name, BACKENDS[name].fn(q, k, v, options)
        except UnsupportedError as again:
            error = again


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The attention probabilities ``softmax(q k^T * scale + mask)`` of an ``attention()`` call, after dropout.

    The same formula as the ``math`` backend (in q's dtype; pass float64 inputs for reference
    precision) with exactly ``attention()``'s conventions: bool/additive masks, bottom-right causal,
    GQA, dropout scaled by ``1/(1-p)``, and all-zero rows for queries with no allowed key. So
    ``attention_weights(q, k, **options) @ v`` is ``attention(q, k, v, backend="math", **options)``
    (with ``v`` repeated over the query heads of its group for GQA).

    Args:
        q: ``(B, Hq, Sq, D)``.
        k: ``(B, Hkv, Skv, D)`` with ``Hq % Hkv == 0``.
        mask, causal, scale, dropout_p, dropout_mask: as in ``attention()``.

    Returns:
        ``(B, Hq, Sq, Skv)`` in q's dtype; each row sums to 1 (before dropout) or is all zeros.

    Example::

        weights = attention_weights(q, k, causal=True)   # what each query attends to
    """
    # k stands in for v: every check on v (type, shape, dtype, device against q and k) then
    # holds or has already failed for k, so errors name only q, k and the options.
    attention_spec(q, k, k, mask=mask, causal=causal, scale=scale, dropout_p=dropout_p, dropout_mask=dropout_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if mask is not None and not isinstance(mask, _TENSOR):
        mask = resolve_block_pattern(mask, q, k)
    options = AttentionOptions(mask=mask, causal=causal, scale=scale, dropout_p=float(dropout_p), dropout_mask=dropout_mask)
    weights, _ = explicit_weights(q, k, options)
    return weights
