"""Boundary checks for attention inputs; every failure names the parameter, expected and got."""

from __future__ import annotations

import math

import torch

from attnkit.errors import check_type, fail
from attnkit.ops.cache import per_mask
from attnkit.ops.options import AttentionOptions, _BlockMask, is_block_mask
from attnkit.ops.spec import AttentionSpec, mask_kind

__all__ = ["attention_spec", "resolve_block_pattern"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_mask_shape(name: str, mask: torch.Tensor, target: tuple[int, ...], device: torch.device) -> None:
    if not (mask.dim() <= 4):
        fail(name, f"a tensor broadcastable to (B, Hq, Sq, Skv) = {target}", mask)
    try:
        broadcast = torch.broadcast_shapes(mask.shape, target)
    except RuntimeError:
        broadcast = None
    if not (broadcast == torch.Size(target)):
        fail(name, f"a tensor broadcastable to (B, Hq, Sq, Skv) = {target}", mask)
    if not (mask.device == device):
        fail(name, f"a tensor on {device} (q's device)", mask)


def attention_spec(
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
    q_start: int | None = None,
    kv_start: int | None = None,
    options: AttentionOptions | None = None,
) -> AttentionSpec:
    """Validate the arguments of an ``attention()`` call and describe it as an :class:`AttentionSpec`.

    Takes ``attention()``'s keywords or ``options`` (an :class:`AttentionOptions`), not both.
    Raises ``InvalidArgumentError``/``InvalidTypeError`` naming the parameter, expected and got.

    Example::

        spec = attention_spec(q, k, v, causal=True)
        select_backend(spec)  # what auto would run, and why not the others
    """
    if options is not None:
        check_type(options, AttentionOptions, "options")
        mask, causal, scale, dropout_p = options.mask, options.causal, options.scale, options.dropout_p
        dropout_mask, return_lse, q_start, kv_start = options.dropout_mask, options.return_lse, options.q_start, options.kv_start
    # Checks are `if not (condition): fail(...)` so that messages are formatted only on failure.
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_type(tensor, torch.Tensor, name)
        if not (tensor.dim() == 4):
            fail(name, "a 4-D tensor (B, H, S, D)", tensor, "Add a heads dimension or use nn.MultiHeadAttention.")
        if not (tensor.dtype in _FLOAT_DTYPES):
            fail(name, "a float16/bfloat16/float32/float64 tensor", tensor)
        if not (min(tensor.shape[1:]) >= 1):
            fail(name, "no empty dimension other than the batch", tensor)
    for name, tensor in (("k", k), ("v", v)):
        if not (tensor.dtype == q.dtype):
            fail(f"{name}.dtype", f"q's dtype {q.dtype}", tensor.dtype)
        if not (tensor.device == q.device):
            fail(f"{name}.device", f"q's device {q.device}", tensor.device)
        if not (tensor.shape[0] == q.shape[0]):
            fail(f"{name}.shape[0] (batch)", f"q's batch {q.shape[0]}", tensor)
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_kv = k.shape[1], k.shape[2]
    if not (k.shape[3] == head_dim):
        fail("k.shape[3] (head dim)", f"q's head dim {head_dim}", k)
    if not (v.shape[1] == heads_kv):
        fail("v.shape[1] (heads)", f"k's KV heads {heads_kv}", v)
    if not (v.shape[2] == seq_kv):
        fail("v.shape[2] (sequence)", f"k's sequence length {seq_kv}", v)
    if not (heads_q % heads_kv == 0):
        fail(
            "k.shape[1] (KV heads)",
            f"a divisor of q's {heads_q} heads",
            heads_kv,
            "For GQA/MQA, query head h uses KV head h // (Hq // Hkv).",
        )
    target = (batch, heads_q, seq_q, seq_kv)
    if mask is not None and not isinstance(mask, torch.Tensor):
        mask = resolve_block_pattern(mask, q, k)
        _check_block_mask(mask, target, q.device)
    elif mask is not None:
        if not (mask.dtype == torch.bool or mask.is_floating_point()):
            fail("mask.dtype", "bool (True = attend) or floating (additive)", mask.dtype)
        _check_mask_shape("mask", mask, target, q.device)
    check_type(causal, bool, "causal")
    if causal and mask is not None and not isinstance(mask, torch.Tensor):
        fail("causal", "False with a BlockMask", causal, "Put causality in the BlockMask's mask_mod (and_masks(causal, ...)).")
    for name, start in (("q_start", q_start), ("kv_start", kv_start)):
        if start is not None:
            check_type(start, int, name)
            if not (start >= 0):
                fail(name, "a global position >= 0 (or None for bottom-right causal)", start)
    positioned = q_start is not None or kv_start is not None
    if scale is not None:
        check_type(scale, (int, float), "scale")
        if not (math.isfinite(scale) and scale > 0):
            fail("scale", "a finite float > 0 (default 1/sqrt(D))", scale)
    check_type(dropout_p, (int, float), "dropout_p")
    if not (0.0 <= dropout_p < 1.0):
        fail("dropout_p", "a float in [0, 1)", dropout_p)
    if dropout_mask is not None:
        check_type(dropout_mask, torch.Tensor, "dropout_mask")
        if not (dropout_mask.dtype == torch.bool):
            fail("dropout_mask.dtype", "bool (True = keep)", dropout_mask.dtype)
        _check_mask_shape("dropout_mask", dropout_mask, target, q.device)
        if dropout_p == 0:
            fail("dropout_p", "a float in (0, 1) when dropout_mask is given", dropout_p, "Kept values are scaled by 1/(1-dropout_p).")
    check_type(return_lse, bool, "return_lse")
    return AttentionSpec(
        batch=batch,
        heads_q=heads_q,
        seq_q=seq_q,
        head_dim=head_dim,
        heads_kv=heads_kv,
        seq_kv=seq_kv,
        head_dim_v=v.shape[3],
        device=q.device.type,
        dtype=q.dtype,
        mask=mask_kind(mask),
        causal=causal,
        causal_offset=(q_start or 0) - (kv_start or 0) if causal and positioned else None,
        dropout_p=float(dropout_p),
        dropout_mask=dropout_mask is not None,
        need_lse=return_lse,
        requires_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
        mask_requires_grad=torch.is_grad_enabled() and isinstance(mask, torch.Tensor) and mask.requires_grad,
    )


def resolve_block_pattern(mask, q: torch.Tensor, k: torch.Tensor):
    """A sparsity pattern's ``block_mask(batch, heads, seq_q, seq_kv, device)`` (once per pattern and shape),
    or ``mask`` itself when it is already a ``BlockMask``."""
    if not is_block_mask(mask):
        fail("mask", "a bool or floating tensor, a FlexAttention BlockMask, or a pattern with block_mask(...)", mask)
    if _BlockMask is not None and isinstance(mask, _BlockMask):
        return mask
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return per_mask(mask, ("block_mask", shape, q.device), lambda: mask.block_mask(*shape, device=q.device))


def _check_block_mask(mask, target: tuple[int, int, int, int], device: torch.device) -> None:
    if not (_BlockMask is not None and isinstance(mask, _BlockMask)):
        fail("mask.block_mask(...)", "a FlexAttention BlockMask", mask)
    batch, heads, seq_q, seq_kv = (int(n) for n in mask.shape)
    if not (batch in (1, target[0]) and heads in (1, target[1]) and (seq_q, seq_kv) == target[2:]):
        fail("mask", f"a BlockMask of shape (B or 1, Hq or 1, Sq, Skv) = {target}", tuple(mask.shape))
    if not (mask.kv_num_blocks.device == device):
        fail("mask", f"a BlockMask on {device} (q's device)", mask.kv_num_blocks.device)
