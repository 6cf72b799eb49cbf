"""The attention core of a layer built with ``sparsity=``: the layer's masks folded into the pattern.

What combines with a pattern, and how:

=====================  ================================================================
layer argument          with ``sparsity``
=====================  ================================================================
``is_causal``           ANDed with the pattern (``pattern & Causal()``; a content-aware
                        selection's ``base`` likewise), bottom-right aligned; a sliding
                        window or packed documents become their causal form instead (the
                        same mask as one pattern; equal documents then run on dense kernels)
``key_padding_mask``    bool only: ANDed per batch entry; key blocks with no kept key skipped
``kv_cache``            the pattern sees every cached key (queries are the last ``Sq`` positions)
``attn_mask``           refused: a dense ``(Sq, Skv)`` mask would bring back the ``Sq * Skv``
                        work sparsity removes; express it as a pattern (``PrefixLM``, ``Documents``, ``&``)
``need_weights=True``   refused: the skipped blocks have no weights to return
=====================  ================================================================
"""

from __future__ import annotations

import dataclasses

import torch

from attnkit.errors import UnsupportedError, check_arg
from attnkit.nn.config import MultiHeadAttentionConfig
from attnkit.nn.kv_cache import KVCache
from attnkit.nn.masks import key_padding_to_keep
from attnkit.sparse import Causal, ContentAware, Documents, SlidingWindow, sparse_attention

__all__ = ["sparse_attend"]


def _causal(sparsity):
    if isinstance(sparsity, ContentAware):
        return dataclasses.replace(sparsity, base=sparsity.base & Causal())
    if isinstance(sparsity, (SlidingWindow, Documents)):  # |p - j| < W and j <= p is 0 <= p - j < W
        return dataclasses.replace(sparsity, causal=True)
    return sparsity & Causal()


def sparse_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: MultiHeadAttentionConfig,
    *,
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    need_weights: bool,
    is_causal: bool,
    kv_cache: KVCache | None,
) -> torch.Tensor:
    """``out (B, Hq, Sq, Dv)`` of ``q (B, Hq, Sq, D)``, ``k (B, Hkv, Skv, D)``, ``v (B, Hkv, Skv, Dv)``
    under ``config.sparsity`` and the layer's masks in torch's convention (see the module docstring)."""
    if need_weights:
        raise UnsupportedError("MultiHeadAttention(sparsity=...) computes only the pattern's blocks and has no "
                               "attention weights to return; call it with need_weights=False.")
    if attn_mask is not None:
        raise UnsupportedError("MultiHeadAttention(sparsity=...) does not take a dense attn_mask (it would cost the "
                               "Sq x Skv work sparsity saves); combine a pattern instead, e.g. sparsity=SlidingWindow(256) "
                               "& Documents(lengths), or use key_padding_mask for padding.")
    check_arg(key_padding_mask is None or key_padding_mask.dtype == torch.bool, "key_padding_mask",
              "a bool tensor (True = ignore that key) with sparsity", key_padding_mask)
    keep = key_padding_to_keep(key_padding_mask, batch=k.shape[0], seq_kv=k.shape[2])  # (B, Skv), True = attend
    if kv_cache is not None:
        k, v, keep = kv_cache.update(k, v, keep)
    sparsity = _causal(config.sparsity) if is_causal else config.sparsity
    return sparse_attention(q, k, v, sparsity, scale=config.softmax_scale, key_mask=keep)
