"""torch's fused inference kernel for the calls where ``nn.MultiheadAttention`` itself would run it.

In eval mode with no gradient to record, ``nn.MultiheadAttention`` skips its Python path and calls
``torch._native_multi_head_attention`` (projections, attention and output projection in one op).
:class:`~attnkit.nn.MultiHeadAttention` does the same for the same calls, so a swapped-in layer
costs no more host time than torch's and gives torch's numbers. :func:`why_not_fast_path` is the
one rule (torch's conditions, narrowed to what keeps attnkit's contract); like torch's
``why_not_fast_path`` it names the first reason a call stays on the general path, or None.

attnkit's extras are never on this path: GQA/MQA, other head sizes or scales, a KV cache,
sparsity, a forced ``backend``, ``query_chunk_size``, ``is_causal``, ``need_weights=True``,
``attn_mask`` (a query row it masks completely, in any head, gets NaN from the fused kernel on CPU
and zeros from attnkit, and only a device sync could find such rows) and float masks (torch leaves
its fast path for those too). A bool ``key_padding_mask`` is: a batch element whose every key is
padding gets attnkit's zero-attention result (the output bias) instead of the kernel's NaN, with
one reduction and one ``where``, no sync; the mask's additive form and that reduction are built
once per mask object (``ops.cache.per_mask``), so a stack of layers sharing one mask pays them once.

Tracing (``torch.compile``, ``torch.export``), any torch dispatch mode (``make_fx``, fake tensors)
and any torch function mode or tensor subclass (``attnkit.discover``'s interceptor) keep the
general path, so graphs and interceptors see ``attnkit.ops.attention`` as before. A call on this
path does not reach ``attnkit.ops``: its call memo (``ops/calls.py``) is untouched and a probe of
the layer's backend should ask :func:`why_not_fast_path` first.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.nn.masks import masked_out_to_additive
from attnkit.ops.cache import per_mask

__all__ = ["why_not_fast_path", "fast_path"]

_TENSOR = torch.Tensor
_DEVICES = ("cpu", "cuda")
_is_compiling = torch.compiler.is_compiling
_is_grad_enabled = torch.is_grad_enabled
_is_autocast_enabled = torch.is_autocast_enabled
_has_torch_function = torch.overrides.has_torch_function  # also True while a torch function mode is active
_dispatch_modes = torch._C._len_torch_dispatch_stack  # make_fx, FakeTensorMode, ...
_native = torch._native_multi_head_attention


def why_not_fast_path(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    kv_cache: object = None,
    dropout_mask: torch.Tensor | None = None,
) -> str | None:
    """Why ``module(query, key, value, ...)`` does not run torch's fused kernel, or None when it does.

    ``module`` is a :class:`~attnkit.nn.MultiHeadAttention` (typed ``nn.Module``: this file sits below
    ``multihead`` in the import graph); the other arguments are those of its ``forward``, with
    ``key``/``value`` already defaulted.
    Inputs the layer would reject get a reason here, so the general path raises its usual error.

    Example::

        why_not_fast_path(mha, x, x, x, need_weights=False)   # None in eval under no_grad
    """
    reason = _why_not_layer(module, need_weights, attn_mask, is_causal, kv_cache, dropout_mask)
    return reason or _why_not_inputs(module.config, _parameters(module), query, key, value, key_padding_mask)


def fast_path(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None,
    need_weights: bool,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    kv_cache: object,
    dropout_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, None] | None:
    """``(out (B, S, E), None)`` from ``torch._native_multi_head_attention`` with the arguments
    ``nn.MultiheadAttention`` passes it, or None (nothing run) when :func:`why_not_fast_path` gives a reason."""
    if _why_not_layer(module, need_weights, attn_mask, is_causal, kv_cache, dropout_mask) is not None:
        return None
    cfg = module.config
    params = _parameters(module)  # fetched once: each nn.Module attribute costs a lookup
    if _why_not_inputs(cfg, params, query, key, value, key_padding_mask) is not None:
        return None
    if key_padding_mask is None:
        return _native(query, query, query, cfg.embed_dim, cfg.num_heads, *params, None, False, True, None)[0], None
    # Built once per mask object (a TransformerEncoder hands every layer the same one), rebuilt after an
    # in-place change: the additive form torch's kernel takes, and the batch elements with no key to attend.
    padding, no_key = per_mask(key_padding_mask, ("fast path", query.dtype), lambda: _padding(key_padding_mask, query.dtype))
    out, _ = _native(query, query, query, cfg.embed_dim, cfg.num_heads, *params, padding, False, True, 1)  # (B, S, E)
    # A batch element with no key to attend: zero attention, i.e. the output bias (NaN from the kernel on CPU).
    return torch.where(no_key, params[3], out), None


def _padding(key_padding_mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(additive mask (B, S) in dtype, bool (B, 1, 1): the element has no key to attend)``."""
    return masked_out_to_additive(key_padding_mask, dtype), key_padding_mask.all(dim=1).view(-1, 1, 1)


def _parameters(module: nn.Module) -> tuple[torch.Tensor, ...]:
    """``(in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias)``, the kernel's order."""
    out_proj = module.out_proj
    return module.in_proj_weight, module.in_proj_bias, out_proj.weight, out_proj.bias


def _why_not_layer(module: nn.Module, need_weights, attn_mask, is_causal, kv_cache, dropout_mask) -> str | None:
    """The reasons that depend on the layer, its mode and the call's options (no tensor is read)."""
    cfg = module.config
    if need_weights:
        return "need_weights=True"
    if attn_mask is not None or is_causal or kv_cache is not None or dropout_mask is not None:
        return "attn_mask, is_causal, kv_cache or dropout_mask given"
    if module.training:
        return "training mode"
    if not (cfg.batch_first and cfg.bias and cfg.num_heads % 2 == 0):
        return "batch_first=False, bias=False or an odd num_heads (torch's fast path needs all three)"
    if cfg.num_kv_heads != cfg.num_heads or cfg.head_dim * cfg.num_heads != cfg.embed_dim or cfg.v_head_dim != cfg.head_dim:
        return "heads differ from torch's (num_kv_heads, head_dim or v_head_dim)"
    if not cfg.packed or cfg.add_bias_kv or cfg.add_zero_attn or cfg.scale not in (None, cfg.head_dim**-0.5):
        return "kdim/vdim, add_bias_kv, add_zero_attn or scale differ from torch's fast path"
    if cfg.backend != "auto" or cfg.query_chunk_size is not None or cfg.sparsity is not None:
        return "a forced backend, query_chunk_size or sparsity"
    if not torch.backends.mha.get_fastpath_enabled():
        return "torch.backends.mha.get_fastpath_enabled() is False"
    return None


def _why_not_inputs(cfg, params: tuple[torch.Tensor, ...], query, key, value, key_padding_mask) -> str | None:
    """The reasons that depend on the tensors and on global state (grad mode, tracing, modes, autocast)."""
    if query is not key or key is not value:
        return "not self-attention (query, key and value are not one tensor)"
    if type(query) is not _TENSOR or query.is_nested or query.dim() != 3 or query.numel() == 0:
        return "query is not a non-empty 3-D dense torch.Tensor"
    weight, bias = params[0], params[1]
    if query.shape[2] != cfg.embed_dim or query.dtype != weight.dtype or bias.dtype != weight.dtype:
        return "query's features or dtype differ from the projection's"
    if query.device.type not in _DEVICES or weight.device.type not in _DEVICES:
        return "not on CPU or CUDA"
    if key_padding_mask is not None and (
        type(key_padding_mask) is not _TENSOR
        or key_padding_mask.dtype != torch.bool
        or key_padding_mask.shape != query.shape[:2]
    ):
        return "key_padding_mask is not a bool (B, S) tensor"
    tensors = (query, *params)
    if _is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "autograd is recording (grad enabled and an input or weight requires grad)"
    if _is_compiling() or _dispatch_modes() or _has_torch_function(tensors) or _is_autocast_enabled():
        return "tracing, a torch dispatch/function mode, a tensor subclass or autocast is active"
    return None
