"""The attention core of the layer: `attnkit.ops.attention`, optionally in query chunks, optionally
returning the attention weights.

Query chunking is exact: every chunk attends to all of the keys it may see, so it only bounds
the ``(chunk, Skv)`` score memory. With ``causal=True`` a chunk ending at query row ``stop``
attends to keys ``[:stop + Skv - Sq]``; bottom-right alignment on that prefix is the same mask
as on the whole problem, and the truncated keys would all have been masked anyway::

    Sq=4, Skv=6, chunk=2   rows 0-1 use keys [:4]    rows 2-3 use keys [:6]
        k: 0 1 2 3 4 5
    q0:    x x x . . .
    q1:    x x x x . .
    q2:    x x x x x .
    q3:    x x x x x x
"""

from __future__ import annotations

import torch

from attnkit.ops import attention, attention_weights

__all__ = ["attend"]


def _rows_and_keys(mask: torch.Tensor | None, rows: slice, num_keys: int) -> torch.Tensor | None:
    """A ``(..., Sq|1, Skv)`` mask restricted to query ``rows`` and the first ``num_keys`` keys."""
    if mask is None:
        return None
    if mask.shape[-2] != 1:
        mask = mask[..., rows, :]
    return mask[..., :num_keys] if mask.shape[-1] != 1 else mask


def _weights_then_output(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str, **options
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, weights)`` through the explicit math path.

    ``attention_weights`` shares the op's masking, scaling, dropout and empty-row rules exactly;
    the output is then one ``(Sq, Skv) x (Skv, Dv)`` product per head. A layer pinned to the
    float64 reference gets its weights in float64 too (cast back to q's dtype), like the op.
    """
    heads_kv = v.shape[1]
    if backend == "reference":
        weights = attention_weights(q.double(), k.double(), **options).to(q.dtype)  # (B, Hq, Sq, Skv), dropped out
    else:
        weights = attention_weights(q, k, **options)
    group = q.shape[1] // heads_kv
    # Query head h reads KV head h // group: view the query heads as (Hkv, group).
    out = weights.unflatten(1, (heads_kv, group)) @ v.unsqueeze(2)  # (B, Hkv, group, Sq, Dv)
    return out.flatten(1, 2), weights


def _empty_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_weights: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention when ``B``, ``Sq`` or ``Skv`` is 0, which the op rejects and ``nn.MultiheadAttention`` accepts.

    Plain matmuls give the empty result, or zeros when only ``Skv`` is 0 (no key to attend: the
    op's empty-row rule, and what torch gives), still connected to q, k and v for autograd. Masks
    and dropout have nothing to act on.
    """
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, Hq, Skv, D|Dv)
    weights = (q @ k.transpose(-1, -2)).softmax(dim=-1)  # (B, Hq, Sq, Skv), empty
    return weights @ v, weights if need_weights else None


def _attend_once(q, k, v, *, need_weights: bool, backend: str, **options):
    if need_weights:
        return _weights_then_output(q, k, v, backend=backend, **options)
    return attention(q, k, v, backend=backend, **options), None


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    dropout_mask: torch.Tensor | None,
    backend: str,
    need_weights: bool,
    query_chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention for ``q (B, Hq, Sq, D)``, ``k (B, Hkv, Skv, D)``, ``v (B, Hkv, Skv, Dv)``.

    ``mask``/``dropout_mask`` follow the ops convention (True = attend / keep), broadcastable to
    ``(B, Hq, Sq, Skv)``. Returns ``out (B, Hq, Sq, Dv)`` and, with ``need_weights``, the
    post-dropout weights ``(B, Hq, Sq, Skv)`` (else None).
    """
    seq_q, seq_kv = q.shape[2], k.shape[2]
    if q.numel() == 0 or seq_kv == 0:
        return _empty_attention(q, k, v, need_weights)
    if not need_weights and (query_chunk_size is None or query_chunk_size >= seq_q):  # the common call, straight to the op
        return attention(q, k, v, mask=mask, causal=causal, scale=scale, dropout_p=dropout_p, dropout_mask=dropout_mask, backend=backend), None
    options = dict(causal=causal, scale=scale, dropout_p=dropout_p, backend=backend, need_weights=need_weights)
    if query_chunk_size is None or query_chunk_size >= seq_q:
        return _attend_once(q, k, v, mask=mask, dropout_mask=dropout_mask, **options)
    outs, weights = [], []
    for start in range(0, seq_q, query_chunk_size):
        rows = slice(start, min(start + query_chunk_size, seq_q))
        num_keys = min(seq_kv, rows.stop + seq_kv - seq_q) if causal else seq_kv
        if num_keys <= 0:
            # Causal with Sq > Skv: no query of this chunk may see any key, and the contract
            # gives such rows zeros.
            out = q.new_zeros(*q.shape[:2], rows.stop - start, v.shape[-1])
            weight = q.new_zeros(*q.shape[:2], rows.stop - start, seq_kv) if need_weights else None
        else:
            out, weight = _attend_once(
                q[:, :, rows],
                k[:, :, :num_keys],
                v[:, :, :num_keys],
                mask=_rows_and_keys(mask, rows, num_keys),
                dropout_mask=_rows_and_keys(dropout_mask, rows, num_keys),
                **options,
            )
            if weight is not None:
                weight = torch.nn.functional.pad(weight, (0, seq_kv - num_keys))
        outs.append(out)
        weights.append(weight)
    return torch.cat(outs, dim=2), torch.cat(weights, dim=2) if need_weights else None
