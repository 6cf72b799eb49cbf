"""`MultiHeadAttention`: a drop-in for ``nn.MultiheadAttention`` with GQA/MQA, d_k != d_v, KV caching
and a choice of ``attnkit.ops`` backend.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.errors import check_arg, check_type, fail
from attnkit.nn.attend import attend
from attnkit.nn.config import MultiHeadAttentionConfig
from attnkit.nn.fast_path import fast_path
from attnkit.nn.kv_cache import KVCache
from attnkit.nn.masks import CausalRule, append_allowed_keys, attn_mask_to_ops, causal_rule, combine_masks, key_padding_to_keep
from attnkit.nn.sparse import sparse_attend
from attnkit.ops import causal_mask
from attnkit.sparse import ContentAware, Pattern

__all__ = ["MultiHeadAttention"]

_TENSOR = torch.Tensor
_is_compiling = torch.compiler.is_compiling
# (config, shapes, float-ness) of inputs that passed `_validate_inputs` -> batched; bounded, cleared when full.
_VALID_LAYOUTS: dict[tuple, bool] = {}
_MAX_LAYOUTS = 1024


def _config_field(name: str) -> property:
    return property(lambda self: getattr(self.config, name), doc=f"``config.{name}`` (read-only).")


class MultiHeadAttention(nn.Module):
    """Multi-head attention with the interface, parameter names and numerics of ``nn.MultiheadAttention``.

    Beyond torch: ``num_kv_heads`` (GQA; 1 = MQA), ``head_dim``/``v_head_dim`` (heads that do not
    tile ``embed_dim``, d_k != d_v), ``scale``, a :class:`KVCache`, exact ``query_chunk_size``
    chunking, ``backend`` (any ``attnkit.ops`` backend; ``"auto"`` picks per call), and ``sparsity``
    (a pattern or content-aware selection run block-sparse; see :mod:`attnkit.nn.sparse` for the
    masks it combines with).

    Parameters (names as in torch, so state dicts load both ways where shapes agree):
    ``in_proj_weight (Hq*D + Hkv*D + Hkv*Dv, E)`` when ``kdim == vdim == embed_dim`` (packed),
    else ``q_proj_weight (Hq*D, E)``, ``k_proj_weight (Hkv*D, kdim)``, ``v_proj_weight (Hkv*Dv, vdim)``;
    ``in_proj_bias`` (same rows), ``out_proj`` (``Hq*Dv -> E``), ``bias_k``/``bias_v`` with ``add_bias_kv``.

    Masks keep torch's convention at this layer: bool ``attn_mask`` True = may NOT attend, bool
    ``key_padding_mask`` True = ignore that key, float masks are added to the scores
    (:mod:`attnkit.nn.masks` translates them once to the ops convention, True = may attend).
    ``need_weights`` defaults to True as in torch; pass False for the fast path. In eval mode with no
    gradient to record, calls that ``nn.MultiheadAttention`` sends to its fused kernel
    (``torch._native_multi_head_attention``) go there here too, with torch's numbers
    (:mod:`attnkit.nn.fast_path`; :func:`~attnkit.nn.fast_path.why_not_fast_path` says why a call does not).

    Args: torch's constructor arguments in torch's order with torch's defaults (``batch_first=False``,
    so ``MultiHeadAttention(16, 4, 0.1)`` works), then attnkit's extras, keyword-only; see
    :class:`MultiHeadAttentionConfig` for each. ``device``/``dtype`` place the parameters.
    ``is_causal`` follows torch's rule (with ``attn_mask`` it is a hint); alone, where torch raises,
    it is a bottom-right causal mask. Empty batches and sequences work as in torch.

    Example::

        mha = MultiHeadAttention(512, 8, batch_first=True, num_kv_heads=2)
        out, _ = mha(x, need_weights=False, is_causal=True)           # causal self-attention, (B, S, 512)
        out, w = mha(x, memory, memory, key_padding_mask=pad)          # cross-attention + weights
    """

    # torch.nn.TransformerEncoderLayer runs a fused kernel in eval mode that reads the projection
    # weights and never calls self_attn when this is True; False makes those layers call us.
    _qkv_same_embed_dim = False

    embed_dim = _config_field("embed_dim")
    num_heads = _config_field("num_heads")
    num_kv_heads = _config_field("num_kv_heads")
    kdim = _config_field("kdim")
    vdim = _config_field("vdim")
    head_dim = _config_field("head_dim")
    v_head_dim = _config_field("v_head_dim")
    add_zero_attn = _config_field("add_zero_attn")
    dropout = _config_field("dropout")
    batch_first = _config_field("batch_first")

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        v_head_dim: int | None = None,
        scale: float | None = None,
        backend: str = "auto",
        query_chunk_size: int | None = None,
        sparsity: Pattern | ContentAware | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg = MultiHeadAttentionConfig(
            embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
            num_kv_heads=num_kv_heads, head_dim=head_dim, v_head_dim=v_head_dim, scale=scale, backend=backend,
            query_chunk_size=query_chunk_size, sparsity=sparsity,
        )  # fmt: skip
        factory = {"device": device, "dtype": dtype}
        size_q, size_k, size_v = cfg.proj_sizes
        # Register every torch name (None when unused) so attribute access matches nn.MultiheadAttention.
        weights = {"in_proj_weight": None, "q_proj_weight": None, "k_proj_weight": None, "v_proj_weight": None}
        if cfg.packed:
            weights["in_proj_weight"] = (size_q + size_k + size_v, cfg.embed_dim)
        else:
            weights.update(q_proj_weight=(size_q, cfg.embed_dim), k_proj_weight=(size_k, cfg.kdim), v_proj_weight=(size_v, cfg.vdim))
        weights["in_proj_bias"] = (size_q + size_k + size_v,) if cfg.bias else None
        weights["bias_k"] = (1, 1, size_k) if cfg.add_bias_kv else None
        weights["bias_v"] = (1, 1, size_v) if cfg.add_bias_kv else None
        for name, shape in weights.items():
            self.register_parameter(name, None if shape is None else nn.Parameter(torch.empty(shape, **factory)))
        self.out_proj = nn.Linear(cfg.num_heads * cfg.v_head_dim, cfg.embed_dim, bias=cfg.bias, **factory)
        self._reset_parameters()

    @classmethod
    def from_config(cls, config: MultiHeadAttentionConfig, *, device=None, dtype=None) -> "MultiHeadAttention":
        """A freshly initialized layer for ``config``."""
        # Not dataclasses.asdict: it would turn a sparsity pattern (a dataclass) into a dict.
        fields = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
        return cls(**fields, device=device, dtype=dtype)

    def _reset_parameters(self) -> None:
        # The same initializers, in the same order, as nn.MultiheadAttention: one seed gives one model.
        for weight in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if weight is not None:
                nn.init.xavier_uniform_(weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        kv_cache: KVCache | None = None,
        dropout_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from ``query`` to ``key``/``value``; same positional order as ``nn.MultiheadAttention``.

        Args:
            query: ``(B, Sq, E)`` (``(Sq, B, E)`` if not ``batch_first``; ``(Sq, E)`` unbatched).
            key: ``(B, Skv, kdim)``, laid out like query; defaults to ``query`` (self-attention).
            value: ``(B, Skv, vdim)``; defaults to ``key``.
            key_padding_mask: ``(B, Skv)``; bool True = ignore that key (torch convention), or
                float added to the scores. With ``kv_cache`` it covers the new keys only (bool only)
                and is cached with them.
            need_weights: also return the attention weights, computed through the explicit math
                path (one extra ``(Sq, Skv) x (Skv, Skv)`` product per head). Defaults to True like
                torch, so that swapped-in layers behave the same; pass False for the fast path.
            attn_mask: ``(Sq, Skv)``, ``(B*num_heads, Sq, Skv)`` or 4-D broadcastable to
                ``(B, num_heads, Sq, Skv)``; bool True = may NOT attend (torch convention), or float
                added to the scores. ``Skv`` counts cached keys, not the ``add_bias_kv``/``add_zero_attn`` ones.
            average_attn_weights: average the returned weights over heads.
            is_causal: with ``attn_mask``, torch's hint that the mask is causal: the mask decides,
                exactly as in torch (see :func:`attnkit.nn.masks.causal_rule`). Without
                ``attn_mask`` (where torch raises) a causal mask, bottom-right aligned (query ``i``
                sees key ``j`` iff ``j <= i + Skv - Sq``), so new queries see the whole cache.
            kv_cache: append this call's keys and values to the cache and attend over all of them.
            dropout_mask: bool, broadcastable to ``(B, num_heads, Sq, Skv_total)``, True = keep; fixes
                the dropout pattern (only while dropout is active: training mode and ``dropout > 0``).

        Returns:
            ``out`` shaped like ``query`` with ``embed_dim`` features, and the weights
            ``(B, Sq, Skv_total)`` (``(B, num_heads, Sq, Skv_total)`` without averaging; after dropout, as
            torch) or None. ``Skv_total`` includes cached and ``add_bias_kv``/``add_zero_attn`` keys. A query
            that may attend to no key gets zeros (torch gives NaN).
        """
        key = query if key is None else key
        value = key if value is None else value
        # Where nn.MultiheadAttention runs its fused inference kernel, so do we (attnkit.nn.fast_path).
        fused = fast_path(self, query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                          attn_mask=attn_mask, is_causal=is_causal, kv_cache=kv_cache, dropout_mask=dropout_mask)  # fmt: skip
        if fused is not None:
            return fused
        cfg = self.config
        self_attention = query is key and key is value  # before any re-layout makes new tensor objects
        batched = self._check_inputs(query, key, value)
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not cfg.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        seq_q = query.shape[1]

        q, k, v = self._project(query, key, value, self_attention)  # (B, Hq, Sq, D), (B, Hkv, Skv, D), (B, Hkv, Skv, Dv)
        dropout_p = cfg.dropout if self.training else 0.0
        if dropout_mask is not None and dropout_p == 0:
            fail("dropout_mask", f"None while dropout is inactive (training={self.training}, dropout={cfg.dropout})", dropout_mask)
        if cfg.sparsity is not None:
            out = sparse_attend(q, k, v, cfg, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                need_weights=need_weights, is_causal=is_causal, kv_cache=kv_cache)
            weights = None
        else:
            attn_mask, causal = causal_rule(
                attn_mask, is_causal, key_padding_mask=key_padding_mask, need_weights=need_weights, cached=kv_cache is not None
            )
            k, v, mask, is_causal = self._all_keys_and_mask(k, v, seq_q, key_padding_mask, attn_mask, causal, kv_cache)
            out, weights = attend(
                q, k, v, mask=mask, causal=is_causal, scale=cfg.softmax_scale, dropout_p=dropout_p,
                dropout_mask=dropout_mask, backend=cfg.backend, need_weights=need_weights,
                query_chunk_size=cfg.query_chunk_size,
            )  # fmt: skip
        out = self.out_proj(out.transpose(1, 2).flatten(2))  # (B, Sq, E)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)  # (B, Sq, Skv)
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if cfg.batch_first else out.transpose(0, 1)), weights

    def _check_inputs(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
        """Validate shapes; return whether the inputs are batched.

        The checks depend only on the config and the tensors' types, shapes and float-ness, so a
        layout that passed is remembered and later calls with it skip them (a bad layout is never
        remembered and always raises). Traced calls run the checks, which tracing folds away.
        """
        if type(query) is _TENSOR and type(key) is _TENSOR and type(value) is _TENSOR and not _is_compiling():
            layout = (self.config, query.shape, key.shape, value.shape, query.is_floating_point(), key.is_floating_point(), value.is_floating_point())
            batched = _VALID_LAYOUTS.get(layout)
            if batched is None:
                batched = self._validate_inputs(query, key, value)
                if len(_VALID_LAYOUTS) >= _MAX_LAYOUTS:
                    _VALID_LAYOUTS.clear()
                _VALID_LAYOUTS[layout] = batched
            return batched
        return self._validate_inputs(query, key, value)

    def _validate_inputs(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
        """Every check of :meth:`_check_inputs`, raising the user's error; returns whether the inputs are batched."""
        cfg = self.config
        layout = "(B, S, E)" if cfg.batch_first else "(S, B, E)"
        for name, tensor, features in (("query", query, "embed_dim"), ("key", key, "kdim"), ("value", value, "vdim")):
            check_type(tensor, torch.Tensor, name)
            expected = f"a 3-D {layout} or 2-D unbatched (S, E) floating tensor with last dimension {features}={getattr(cfg, features)}"
            ok = tensor.dim() in (2, 3) and tensor.is_floating_point() and tensor.shape[-1] == getattr(cfg, features)
            check_arg(ok, name, expected, tensor)
        check_arg(key.dim() == query.dim(), "key", f"a {query.dim()}-D tensor like query", key)
        check_arg(value.shape[:-1] == key.shape[:-1], "value", f"the batch and sequence sizes of key {tuple(key.shape[:-1])}", value)
        batch_dim = 0 if cfg.batch_first else 1
        batched = query.dim() == 3
        check_arg(
            not batched or key.shape[batch_dim] == query.shape[batch_dim],
            "key",
            f"batch size {query.shape[batch_dim]} like query (dim {batch_dim}, batch_first={cfg.batch_first})",
            key,
        )
        return batched

    def _project(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, self_attention: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, S, in)`` -> q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Skv, D)``, v ``(B, Hkv, Skv, Dv)`` (views of the
        projections); one matmul when the weight is packed and the inputs are one tensor."""
        cfg = self.config
        weight, bias = self.in_proj_weight, self.in_proj_bias
        graph = torch.is_grad_enabled() and (weight is not None and weight.requires_grad or query.requires_grad)
        if weight is not None and self_attention and cfg.head_dim == cfg.v_head_dim and not graph:
            # One view and one transpose for every head, then a split by heads: the same strides as
            # splitting features first, in 3 ops instead of 7 (per-op dispatch dominates small calls).
            # Not under autograd: its backward (a cat along heads of transposed gradients, then a copy
            # back to (B, S, features)) cost a ViT-B/16 training step at batch 64 1.7 ms more than the
            # features-first split's one vectorized cat (H100: 21.2 vs 19.5 ms of kernels,
            # benchmarks/results/optimize/rewrite-kernels-vit-train-nvidia-h100-2026-11-27-session6-run4.log).
            qkv = F.linear(query, weight, bias)  # (B, S, (Hq + 2 Hkv) * D)
            heads = qkv.view(*qkv.shape[:2], cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
            return heads.split_with_sizes((cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads), dim=1)
        sizes = cfg.proj_sizes
        if weight is not None and self_attention:
            q, k, v = F.linear(query, weight, bias).split_with_sizes(sizes, dim=-1)
        else:
            w_q, w_k, w_v = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight) if weight is None else weight.split(sizes)
            b_q, b_k, b_v = (None, None, None) if bias is None else bias.split(sizes)
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        # view, not unflatten: the same split of the last dimension without Tensor.unflatten's Python wrapper.
        q = q.view(*q.shape[:2], cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(*k.shape[:2], cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        return q, k, v.view(*v.shape[:2], cfg.num_kv_heads, cfg.v_head_dim).transpose(1, 2)

    def _all_keys_and_mask(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        seq_q: int,
        key_padding_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        causal: CausalRule,
        kv_cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """Cached + new + extra keys/values and one mask in the ops convention, plus whether the op's causal flag applies."""
        if attn_mask is None and key_padding_mask is None and kv_cache is None and causal == "none" and self.bias_k is None and not self.config.add_zero_attn:
            return k, v, None, False  # the common call: nothing to translate or append
        batch = k.shape[0]
        keep = key_padding_to_keep(key_padding_mask, batch=batch, seq_kv=k.shape[2])  # (B, Skv), True = attend
        if kv_cache is not None:
            check_type(kv_cache, KVCache, "kv_cache")
            check_arg(
                keep is None or keep.dtype == torch.bool, "key_padding_mask", "a bool tensor when kv_cache is given", key_padding_mask
            )
            k, v, keep = kv_cache.update(k, v, keep)
        mask = attn_mask_to_ops(attn_mask, batch=batch, num_heads=self.config.num_heads, seq_q=seq_q, seq_kv=k.shape[2])
        mask = combine_masks(mask, None if keep is None else keep[:, None, None, :], k.dtype)
        k, v, mask, bottom_right = self._append_extra_keys(k, v, mask, causal == "bottom-right", seq_q)
        if causal != "top-left":
            return k, v, mask, bottom_right
        # SDPA's causal rule over every key (torch's is_causal fast path); no other mask is left here.
        if seq_q == k.shape[2]:
            return k, v, None, True  # square: top-left is the op's bottom-right, and its causal kernels run
        return k, v, causal_mask(seq_q, k.shape[2], device=k.device, offset=0), False

    def _append_extra_keys(
        self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, seq_q: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """Append the ``add_bias_kv`` and ``add_zero_attn`` keys/values (in torch's order), open to every query."""
        cfg = self.config
        batch = k.shape[0]
        extra_k, extra_v = [], []
        if self.bias_k is not None:
            extra_k.append(self.bias_k.view(1, cfg.num_kv_heads, 1, cfg.head_dim).expand(batch, -1, -1, -1))
            extra_v.append(self.bias_v.view(1, cfg.num_kv_heads, 1, cfg.v_head_dim).expand(batch, -1, -1, -1))
        if cfg.add_zero_attn:
            extra_k.append(k.new_zeros(batch, cfg.num_kv_heads, 1, cfg.head_dim))
            extra_v.append(v.new_zeros(batch, cfg.num_kv_heads, 1, cfg.v_head_dim))
        if not extra_k:
            return k, v, mask, causal
        if causal:
            # Bottom-right alignment would count the extra keys as the newest positions; fix the
            # causal pattern on the real keys first, then open the extra columns.
            mask = combine_masks(mask, causal_mask(seq_q, k.shape[2], device=k.device), k.dtype)
        mask = append_allowed_keys(mask, len(extra_k))
        return torch.cat([k, *extra_k], dim=2), torch.cat([v, *extra_v], dim=2), mask, False

    def extra_repr(self) -> str:
        cfg = self.config
        text = f"embed_dim={cfg.embed_dim}, num_heads={cfg.num_heads}, num_kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}"
        if cfg.v_head_dim != cfg.head_dim:
            text += f", v_head_dim={cfg.v_head_dim}"
        if not cfg.packed:
            text += f", kdim={cfg.kdim}, vdim={cfg.vdim}"
        if cfg.sparsity is not None:
            text += f", sparsity={cfg.sparsity!r}"
        return text + f", packed={cfg.packed}, batch_first={cfg.batch_first}, backend={cfg.backend!r}"
