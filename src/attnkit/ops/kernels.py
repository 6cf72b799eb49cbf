"""One attention block with its log-sum-exp, and its backward given the rows' final ``(out, lse)``.

The building blocks of ring attention and of ``attention(..., return_lse=True)``: a block's forward
returns ``(out, lse)`` so partial results merge through ``ops.lse.merge_partials``; its backward takes
the *final* ``out`` and ``lse`` of the rows (which may cover other key blocks too) and returns this
block's share of the gradients, ``P = exp(S * scale - lse)``, ``D = rowsum(grad_out * out)``::

    dS = P * (grad_out @ v^T - D + grad_lse)     dq = dS @ k * scale
    dk = dS^T @ q * scale                        dv = P^T @ grad_out

On CUDA the SDPA ATen kernels run directly (no dispatcher, no global flags):
``_scaled_dot_product_flash_attention`` (its ``is_causal`` is bottom-right aligned, FlashAttention-2's
convention; GQA native), ``_scaled_dot_product_cudnn_attention`` (top-left causal, so only square
causal blocks) and ``_efficient_attention_forward`` (``custom_mask_type=2``: causal from the bottom
right), each with its matching backward. Elsewhere, and for what no kernel takes (float64, odd head
dims), an exact plain-PyTorch path computes in float32 (float64 for float64 inputs).

Precision: ``lse`` comes back in ``promote_types(q.dtype, float32)`` (float64 for float64 inputs, so
chained merges stay exact). With ``accumulate=True`` the plain path also returns ``out`` and the
gradients in that dtype, so a caller that sums blocks (ring attention) rounds once, at the end; the
CUDA kernels write ``out``/``dq``/``dk``/``dv`` in q's dtype themselves (bf16 in, bf16 out), so
their per-block results keep one bf16 rounding each before the caller's float32 sum.

A ``mask`` (bool, True = attend, broadcastable to ``(B, 1, Sq, Skv)``; sliding windows and packed
documents under context parallelism) runs on the plain path on every device.

Bottom-right causal with ``Sq > Skv`` leaves the first ``Sq - Skv`` query rows with no key: those
rows are cut off before any kernel runs (kernels disagree on them) and come back as zeros with
``lse = -inf`` and zero gradient.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple

import torch

from attnkit.errors import check_arg, check_type, fail

__all__ = ["forward_with_lse", "backward_from_lse", "KERNELS", "kernel_for"]

_HALF = (torch.float16, torch.bfloat16)
_NEG_INF = float("-inf")
_aten = torch.ops.aten


# ---------------------------------------------------------------- the exact plain-PyTorch path


def _grouped(q: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """``(B, Hq, S, D) -> (B, Hkv, G*S, D)``: query head ``h`` of KV head ``h // G`` (GQA without copying k, v)."""
    batch, heads_q, seq, dim = q.shape
    return q.reshape(batch, heads_kv, (heads_q // heads_kv) * seq, dim)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype the plain path computes in and ``lse`` comes back in: float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _plain_scores(q, k, causal: bool, scale: float, acc: torch.dtype, mask=None) -> torch.Tensor:
    """Scaled, masked scores ``(B, Hkv, G*Sq, Skv)`` in ``acc``."""
    seq_q, seq_kv = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    scores = (_grouped(q.to(acc), k.shape[1]) @ k.to(acc).transpose(-2, -1)) * scale
    if causal:
        rows = torch.arange(seq_q, device=q.device).repeat(group).unsqueeze(-1)
        scores = scores.masked_fill(torch.arange(seq_kv, device=q.device) > rows + (seq_kv - seq_q), _NEG_INF)
    if mask is not None:  # (B or 1, 1, Sq, Skv) -> (B or 1, 1, G*Sq, Skv), the grouped row order
        scores = scores.masked_fill(~mask.repeat(1, 1, group, 1), _NEG_INF)
    return scores


def _plain_forward(q, k, v, causal, scale, mask=None, accumulate=False):
    acc = _acc(q.dtype)
    scores = _plain_scores(q, k, causal, scale, acc, mask)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # -inf for a row with no key
    probs = torch.exp(scores - lse.masked_fill(lse == _NEG_INF, 0.0))
    out = (probs @ v.to(acc)).reshape(*q.shape[:3], v.shape[-1])
    return out.to(acc if accumulate else q.dtype), lse.reshape(q.shape[:3])


def _plain_backward(grad_out, q, k, v, out, lse, grad_lse, causal, scale, mask=None, accumulate=False):
    acc = _acc(q.dtype)
    heads_kv = k.shape[1]
    lse = lse.to(acc)
    probs = torch.exp(_plain_scores(q, k, causal, scale, acc, mask) - _grouped(lse.masked_fill(lse == _NEG_INF, 0.0).unsqueeze(-1), heads_kv))
    grad_out = _grouped(grad_out.to(acc), heads_kv)
    delta = (grad_out * _grouped(out.to(acc), heads_kv)).sum(-1, keepdim=True)
    if grad_lse is not None:
        delta = delta - _grouped(grad_lse.to(acc).unsqueeze(-1), heads_kv)
    grad_scores = probs * (grad_out @ v.to(acc).transpose(-2, -1) - delta)
    grad_q = (grad_scores @ k.to(acc)) * scale
    grad_k = (grad_scores.transpose(-2, -1) @ _grouped(q.to(acc), heads_kv)) * scale
    grad_v = probs.transpose(-2, -1) @ grad_out
    grad_q = grad_q.reshape(q.shape)
    if accumulate:
        return grad_q, grad_k, grad_v
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


# ---------------------------------------------------------------- the CUDA kernels


def _expand_heads(k, v, heads_q):
    group = heads_q // k.shape[1]
    return (k, v) if group == 1 else (k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))


def _sum_heads(grad, heads_kv):
    batch, heads_q, seq, dim = grad.shape
    return grad if heads_q == heads_kv else grad.view(batch, heads_kv, heads_q // heads_kv, seq, dim).sum(2)


def _kernel_lse(lse: torch.Tensor) -> torch.Tensor:
    """The rows' lse as the backward kernels read it: ``+inf`` for an empty row makes ``P = exp(s - lse) = 0``."""
    return lse.float().masked_fill(lse == _NEG_INF, float("inf")).contiguous()


def _flash_forward(q, k, v, causal, scale):
    out, lse, *_ = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out, lse


def _flash_backward(grad_out, q, k, v, out, lse, causal, scale):
    seq_q, seq_kv = q.shape[2], k.shape[2]
    seed = torch.zeros(2, dtype=torch.uint64, device=q.device)  # no dropout: the rng state is not read
    offset = torch.zeros((), dtype=torch.uint64, device=q.device)
    grads = _aten._scaled_dot_product_flash_attention_backward(
        grad_out, q, k, v, out, _kernel_lse(lse), None, None, seq_q, seq_kv, 0.0, causal, seed, offset, scale=scale
    )
    return grads[0], grads[1], grads[2]


def _cudnn_forward(q, k, v, causal, scale):
    k, v = _expand_heads(k, v, q.shape[1])
    out, lse, *_ = _aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out, lse.reshape(q.shape[:3])


def _cudnn_backward(grad_out, q, k, v, out, lse, causal, scale):
    heads_kv = k.shape[1]
    k, v = _expand_heads(k, v, q.shape[1])
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    lse = _kernel_lse(lse).unsqueeze(-1)  # (B, H, Sq, 1), as the forward returns it
    grad_q, grad_k, grad_v = _aten._scaled_dot_product_cudnn_attention_backward(
        grad_out, q, k, v, out, lse, seed, seed, None, None, None, q.shape[2], k.shape[2], 0.0, causal, scale=scale
    )
    return grad_q, _sum_heads(grad_k, heads_kv), _sum_heads(grad_v, heads_kv)


def _efficient_mask_type(causal: bool) -> int:
    return 2 if causal else 0  # sdp::CustomMaskType: 0 none, 1 causal from top-left, 2 from bottom-right


def _efficient_forward(q, k, v, causal, scale):
    k, v = _expand_heads(k, v, q.shape[1])
    out, lse, *_ = _aten._efficient_attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, None, None, None, 0.0,
        _efficient_mask_type(causal), True, scale=scale,
    )  # fmt: skip
    return out.transpose(1, 2), lse[..., : q.shape[2]]  # lse rows are padded to a multiple of 32


def _efficient_backward(grad_out, q, k, v, out, lse, causal, scale):
    heads_kv, seq_q = k.shape[1], q.shape[2]
    k, v = _expand_heads(k, v, q.shape[1])
    # The forward's padded lse layout; padding rows get +inf (no probability) like empty rows.
    lse = torch.nn.functional.pad(_kernel_lse(lse), (0, -seq_q % 32), value=float("inf"))
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    t = lambda x: x.transpose(1, 2)  # noqa: E731  (B, H, S, D) <-> (B, S, H, D)
    # The kernel reads out (and grad_out) with the row stride of a contiguous (B, S, H, Dv) tensor.
    grad_out, out = t(grad_out).contiguous(), t(out).contiguous()
    grad_q, grad_k, grad_v, _ = _aten._efficient_attention_backward(
        grad_out, t(q), t(k), t(v), None, out, None, None, seq_q, k.shape[2], lse, 0.0, seed, seed,
        _efficient_mask_type(causal), False, scale=scale,
    )  # fmt: skip
    return t(grad_q), _sum_heads(t(grad_k), heads_kv), _sum_heads(t(grad_v), heads_kv)


class Kernel(NamedTuple):
    """A fused CUDA kernel that returns the LSE, with its backward."""

    support: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], "str | None"]
    forward: Callable
    backward: Callable


def _flash_support(q, k, v, causal):
    dim = q.shape[-1]
    if q.dtype not in _HALF or dim != v.shape[-1] or dim % 8 or dim > 256:
        return f"flash needs float16/bfloat16 and D == Dv, a multiple of 8, <= 256; got {q.dtype}, D={dim}, Dv={v.shape[-1]}"
    return None


def _cudnn_support(q, k, v, causal):
    dim = q.shape[-1]
    if q.dtype not in _HALF or dim != v.shape[-1] or dim % 8 or dim > 128:
        return f"cudnn needs float16/bfloat16 and D == Dv, a multiple of 8, <= 128; got {q.dtype}, D={dim}, Dv={v.shape[-1]}"
    if causal and q.shape[2] != k.shape[2]:
        return "cudnn's causal mask is top-left aligned; bottom-right with Sq != Skv needs another kernel"
    return None


def _efficient_support(q, k, v, causal):
    alignment = 8 if q.dtype in _HALF else 4
    if q.dtype not in (*_HALF, torch.float32) or q.shape[-1] % alignment or v.shape[-1] % alignment:
        return f"efficient needs float16/bfloat16/float32 and D, Dv multiples of {alignment}; got {q.dtype}, D={q.shape[-1]}, Dv={v.shape[-1]}"
    return None


KERNELS: dict[str, Kernel] = {
    "cudnn": Kernel(_cudnn_support, _cudnn_forward, _cudnn_backward),
    "flash": Kernel(_flash_support, _flash_forward, _flash_backward),
    "efficient": Kernel(_efficient_support, _efficient_forward, _efficient_backward),
}
"""CUDA kernels, fastest first (``kernel_for`` takes the first that supports a block). Measured forward +
backward at B1 H16 S4096 D128 bf16 (H200, torch 2.11, tests/ops/test_kernels_gpu.py): cuDNN 0.83 ms,
flash 1.60 ms, efficient 3.43 ms; causal 0.59 / 1.12 / 2.28 ms."""

# Kernels that raised at run time, per (kernel, dtype, D, Dv, causal kind): never retried for that key.
_FAILED: dict[tuple, str] = {}


def _failure_key(name, q, k, v, causal):
    return (name, q.device.index, q.dtype, q.shape[-1], v.shape[-1], causal and q.shape[2] != k.shape[2], causal)


def kernel_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> str:
    """The kernel ``forward_with_lse`` runs for this block: a name in ``KERNELS`` or ``"plain"``."""
    if q.device.type != "cuda":
        return "plain"
    for name, kernel in KERNELS.items():
        if kernel.support(q, k, v, causal) is None and _failure_key(name, q, k, v, causal) not in _FAILED:
            return name
    return "plain"


def _run(stage: str, kernel: str | None, q, k, v, causal, plain, fused_args):
    """Run ``stage`` ("forward"/"backward") on ``kernel`` (None = ``kernel_for``); a kernel that raises
    is remembered as failed for this kind of block (with one warning) and the next one runs."""
    while True:
        name = kernel_for(q, k, v, causal=causal) if kernel is None else kernel
        if name == "plain":
            return plain()
        fused = KERNELS[name]
        if kernel is not None and (reason := fused.support(q, k, v, causal)) is not None:
            fail("kernel", f"a kernel that supports this block ({reason})", kernel)
        try:
            return getattr(fused, stage)(*fused_args)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as error:
            if kernel is not None:
                raise
            _FAILED[_failure_key(name, q, k, v, causal)] = str(error)
            warnings.warn(f"attnkit.ops.kernels: {name} {stage} failed ({str(error)[:200]}); using the next kernel", stacklevel=3)


# ---------------------------------------------------------------- the public functions


def _check(q, k, v, causal, scale, kernel, mask=None) -> float:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_type(tensor, torch.Tensor, name)
        check_arg(tensor.dim() == 4, name, "a 4-D tensor (B, H, S, D)", tensor)
    check_arg(k.dtype == q.dtype and v.dtype == q.dtype, "k, v dtype", f"q's dtype {q.dtype}", (k.dtype, v.dtype))
    check_arg(
        k.shape[0] == q.shape[0] and v.shape[:3] == k.shape[:3] and k.shape[3] == q.shape[3] and q.shape[1] % max(k.shape[1], 1) == 0,
        "k, v shapes",
        f"k (B, Hkv, Skv, D), v (B, Hkv, Skv, Dv) with q's B and D and Hq % Hkv == 0, for q {tuple(q.shape)}",
        (tuple(k.shape), tuple(v.shape)),
    )
    check_type(causal, bool, "causal")
    check_arg(kernel is None or kernel == "plain" or kernel in KERNELS, "kernel", f"None, 'plain' or one of {sorted(KERNELS)}", kernel)
    if mask is not None:
        check_type(mask, torch.Tensor, "mask")
        check_arg(
            mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[0] in (1, q.shape[0]) and mask.shape[2:] == (q.shape[2], k.shape[2]),
            "mask",
            f"a bool tensor (B or 1, 1, Sq, Skv) = (*, 1, {q.shape[2]}, {k.shape[2]})",
            (mask.dtype, tuple(mask.shape)),
        )
        check_arg(kernel in (None, "plain"), "kernel", "None or 'plain' with a mask (no fused kernel takes one here)", kernel)
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    check_type(scale, (int, float), "scale")
    return float(scale)


def _first_row(seq_q: int, seq_kv: int, causal: bool) -> int:
    """The first query row that sees a key: bottom-right causal hides keys from rows ``i < Sq - Skv``."""
    return max(0, seq_q - seq_kv) if causal else 0


def forward_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    kernel: str | None = None,
    mask: torch.Tensor | None = None,
    accumulate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of one block and its log-sum-exp, with no autograd.

    Args:
        q: ``(B, Hq, Sq, D)``; k: ``(B, Hkv, Skv, D)``; v: ``(B, Hkv, Skv, Dv)``; ``Hq % Hkv == 0`` (GQA).
        causal: bottom-right aligned, query ``i`` sees key ``j`` iff ``j <= i + Skv - Sq``.
        scale: multiplies ``q k^T``; default ``1/sqrt(D)``.
        kernel: force ``"plain"`` or a name in ``KERNELS`` (tests, benchmarks); default: the fastest that fits.
        mask: bool ``(B or 1, 1, Sq, Skv)``, True = attend, on top of ``causal``; runs the plain path.
        accumulate: return ``out`` in float32 (float64 for float64) where the path computes it so
            (the plain path); the CUDA kernels still return q's dtype.

    Returns:
        ``out (B, Hq, Sq, Dv)`` in q's dtype (see ``accumulate``) and ``lse (B, Hq, Sq)`` in float32,
        float64 for float64 inputs (natural log of the sum of ``exp(scores * scale)``); a row with no
        key gets zeros and ``-inf``.

    Example::

        out_1, lse_1 = forward_with_lse(q, k1, v1, causal=True)     # the diagonal block
        out_2, lse_2 = forward_with_lse(q, k0, v0, causal=False)    # an earlier block
        out, lse = merge_partials(out_1, lse_1, out_2, lse_2)
    """
    scale = _check(q, k, v, causal, scale, kernel, mask)
    seq_q, seq_kv = q.shape[2], k.shape[2]
    nonempty = min(q.numel(), k.numel(), v.numel()) > 0
    if mask is not None and nonempty:
        return _plain_forward(q, k, v, causal, scale, mask, accumulate)
    first = _first_row(seq_q, seq_kv, causal)
    if first == 0 and nonempty:
        return _forward(q, k, v, causal, scale, kernel, accumulate)
    out = q.new_zeros(*q.shape[:3], v.shape[-1], dtype=_acc(q.dtype) if accumulate else q.dtype)
    lse = torch.full(q.shape[:3], _NEG_INF, device=q.device, dtype=_acc(q.dtype))
    if nonempty and first < seq_q:
        out[:, :, first:], lse[:, :, first:] = _forward(q[:, :, first:], k, v, causal, scale, kernel, accumulate)
    return out, lse


def _forward(q, k, v, causal, scale, kernel, accumulate):
    plain = lambda: _plain_forward(q, k, v, causal, scale, accumulate=accumulate)  # noqa: E731
    out, lse = _run("forward", kernel, q, k, v, causal, plain, (q, k, v, causal, scale))
    return out, lse.to(_acc(q.dtype))


def backward_from_lse(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    grad_lse: torch.Tensor | None = None,
    kernel: str | None = None,
    mask: torch.Tensor | None = None,
    accumulate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's ``(dq, dk, dv)`` given the rows' final ``out`` and ``lse``, with no autograd.

    Args:
        grad_out: ``(B, Hq, Sq, Dv)``, the gradient of the rows' final output.
        q, k, v, causal, scale, kernel: this block, as passed to :func:`forward_with_lse`.
        out: ``(B, Hq, Sq, Dv)``, the rows' final output over *every* key block (cast to q's dtype
            for the CUDA kernels, which compute ``D = rowsum(grad_out * out)`` themselves).
        lse: ``(B, Hq, Sq)``, the rows' final log-sum-exp over every key block; ``-inf`` = empty row.
        grad_lse: ``(B, Hq, Sq)`` gradient of ``lse`` when the caller used it (``d lse / d scores = P``).
        mask: the block's bool mask as passed to :func:`forward_with_lse`.
        accumulate: return the gradients in float32 (float64 for float64) where the path computes
            them so (the plain path), for a caller that sums blocks; the CUDA kernels return q's
            dtype (one bf16 rounding per block remains there).

    Returns:
        ``(dq, dk, dv)`` in q's, k's and v's dtypes (see ``accumulate``). Summed over the key blocks of a row (dq) and
        over the query blocks of a key block (dk, dv), they are the gradients of the whole attention.

    Example::

        dq1, dk1, dv1 = backward_from_lse(grad_out, q, k1, v1, out, lse, causal=True)
        dq0, dk0, dv0 = backward_from_lse(grad_out, q, k0, v0, out, lse, causal=False)
        dq = dq0 + dq1
    """
    scale = _check(q, k, v, causal, scale, kernel, mask)
    seq_q, seq_kv = q.shape[2], k.shape[2]
    first = 0 if mask is not None else _first_row(seq_q, seq_kv, causal)
    grad_dtype = _acc(q.dtype) if accumulate else None
    if min(q.numel(), k.numel(), v.numel()) == 0 or first >= seq_q:
        return tuple(torch.zeros_like(x, dtype=grad_dtype) for x in (q, k, v))
    if mask is not None:
        return _plain_backward(grad_out, q, k, v, out, lse, grad_lse, causal, scale, mask, accumulate)
    grad_q = torch.zeros_like(q, dtype=grad_dtype) if first else None
    rows = slice(first, None)
    grad_out, q_rows, out, lse = grad_out[:, :, rows], q[:, :, rows], out[:, :, rows], lse[:, :, rows]
    grad_lse = None if grad_lse is None else grad_lse[:, :, rows]
    dq, dk, dv = _backward(grad_out, q_rows, k, v, out, lse, grad_lse, causal, scale, kernel, accumulate)
    if grad_q is None:
        return dq, dk, dv
    grad_q[:, :, rows] = dq
    return grad_q, dk, dv


def _backward(grad_out, q, k, v, out, lse, grad_lse, causal, scale, kernel, accumulate):
    def plain():
        return _plain_backward(grad_out, q, k, v, out, lse, grad_lse, causal, scale, accumulate=accumulate)

    if grad_lse is None:
        args = (grad_out.to(q.dtype).contiguous(), q, k, v, out.to(q.dtype).contiguous(), lse, causal, scale)
        return _run("backward", kernel, q, k, v, causal, plain, args)
    # d lse enters as D' = rowsum(grad_out * out) - grad_lse: one extra head-dim column with
    # grad_out = 1, out = -grad_lse (rounded to q's dtype, like grad_out itself) and v = 0 makes the
    # kernel compute exactly that (dP is unchanged); zero columns in q and k leave the scores alone,
    # and padding by 8 keeps the head dims multiples of 8.
    pad = 8
    q_pad, k_pad, v_pad = (torch.nn.functional.pad(x, (0, pad)) for x in (q, k, v))
    if kernel is None and kernel_for(q_pad, k_pad, v_pad, causal=causal) == "plain":
        return plain()

    def column(x, last):
        return torch.cat([x.to(q.dtype), last.to(q.dtype), x.new_zeros(*x.shape[:-1], pad - 1, dtype=q.dtype)], dim=-1)

    grad_out_pad = column(grad_out, grad_out.new_ones(*grad_out.shape[:-1], 1))
    out_pad = column(out, -grad_lse.unsqueeze(-1))
    args = (grad_out_pad, q_pad, k_pad, v_pad, out_pad, lse, causal, scale)
    dq, dk, dv = _run("backward", kernel, q_pad, k_pad, v_pad, causal, plain, args)
    if dq.shape[-1] == q.shape[-1]:  # the plain fallback ran, on the unpadded block
        return dq, dk, dv
    return dq[..., : q.shape[-1]], dk[..., : k.shape[-1]], dv[..., : v.shape[-1]]
