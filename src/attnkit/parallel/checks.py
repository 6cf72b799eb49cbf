"""Input checks shared by every context-parallel attention: local shapes, then agreement across ranks."""

from __future__ import annotations

import math
import struct

import torch
import torch.distributed as dist

from attnkit.errors import UnsupportedError, check_arg, check_type
from attnkit.parallel.comm import check_same_across_ranks, group_info
from attnkit.parallel.layout import LAYOUTS, check_layout

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ["check_shards"]


def check_shards(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    causal: bool,
    scale: float | None,
    layout: str,
    verify: bool,
    extra: dict[str, int] | None = None,
) -> tuple[int, int, float]:
    """Check local shards ``q (B, Hq, S/W, D)``, ``k (B, Hkv, S/W, D)``, ``v (B, Hkv, S/W, Dv)``.

    With ``verify``, one small all-gather also checks that every rank passed the same shapes and
    options (and ``extra``, named integers of the caller), so a mismatch raises the same error on every rank instead of hanging a later transfer.

    Returns:
        ``(rank, world_size, scale)`` with the default scale ``1/sqrt(D)`` filled in.
    """
    rank, world_size = group_info(group)
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_type(tensor, torch.Tensor, name)
        check_arg(tensor.dim() == 4, name, "a 4-D local shard (B, H, S_local, D)", tensor)
        check_arg(tensor.is_floating_point(), name, "a floating-point tensor", tensor)
    check_arg(k.dtype == q.dtype and v.dtype == q.dtype, "k, v", f"q's dtype {q.dtype}", (k.dtype, v.dtype))
    check_arg(k.device == q.device and v.device == q.device, "k, v", f"q's device {q.device}", (k.device, v.device))
    check_arg(k.shape[0] == q.shape[0] and v.shape[0] == q.shape[0], "k, v", f"batch {q.shape[0]} as in q", (k.shape[0], v.shape[0]))
    check_arg(v.shape[1] == k.shape[1], "v", f"{k.shape[1]} heads as in k", v.shape[1])
    check_arg(
        q.shape[1] % k.shape[1] == 0,
        "k",
        f"a number of KV heads dividing q's {q.shape[1]} heads (GQA)",
        k.shape[1],
        "Repeat the KV heads or pass the matching q.",
    )
    check_arg(k.shape[3] == q.shape[3], "k", f"head dim {q.shape[3]} as in q", k.shape[3])
    check_arg(
        k.shape[2] == q.shape[2] and v.shape[2] == q.shape[2],
        "k, v",
        f"the local sequence length {q.shape[2]} of q (context parallelism shards one sequence)",
        (k.shape[2], v.shape[2]),
    )
    check_type(causal, bool, "causal")
    check_layout(layout, q.shape[2] * world_size, world_size, parameter="S = q.shape[2] * world_size")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    check_arg(isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0,
              "scale", "a finite positive number (or None for 1/sqrt(D))", scale)
    if verify and world_size > 1:
        values = {
            "q.shape[0] (batch)": q.shape[0],
            "q.shape[1] (query heads)": q.shape[1],
            "k.shape[1] (KV heads)": k.shape[1],
            "q.shape[2] (local sequence length)": q.shape[2],
            "q.shape[3] (head dim)": q.shape[3],
            "v.shape[3] (value head dim)": v.shape[3],
            "causal": int(causal),
            "layout (index in LAYOUTS)": LAYOUTS.index(layout),
            # Different dtypes would make the P2P buffers disagree in size (corrupt data or a hang);
            # different scales would silently compute different attentions on different ranks.
            "q.dtype": _FLOAT_DTYPES.index(q.dtype) if q.dtype in _FLOAT_DTYPES else -1,
            "scale (float64 bits)": struct.unpack("<q", struct.pack("<d", float(scale)))[0],
        }
        values.update(extra or {})
        check_same_across_ranks(values, group, q.device, "Every rank must pass shards of one sequence with the same options.")
    return rank, world_size, float(scale)


def check_masks(q: torch.Tensor, *, causal: bool, window: int | None, document_ids: torch.Tensor | None):
    """Check the mask arguments of ``ring_attention`` / ``ulysses_attention``.

    Returns:
        ``(document_ids, extra)``: the ids as ``(B or 1, S_local)`` (or None) and, for
        :func:`check_shards`, the named integers every rank must agree on.
    """
    if window is not None:
        check_arg(isinstance(window, int) and not isinstance(window, bool) and window >= 1, "window", "an int >= 1 (tokens)", window)
        if not causal:
            raise UnsupportedError("window: a sliding window needs causal=True (query i sees keys i - window < j <= i)")
    if document_ids is not None:
        check_type(document_ids, torch.Tensor, "document_ids")
        if document_ids.dim() == 1:
            document_ids = document_ids.unsqueeze(0)
        check_arg(
            document_ids.dim() == 2 and document_ids.shape[0] in (1, q.shape[0]) and document_ids.shape[1] == q.shape[2] and not document_ids.is_floating_point(),
            "document_ids",
            f"an int tensor (B or 1, S_local) = ({'1' if q.shape[0] == 1 else f'{q.shape[0]} or 1'}, {q.shape[2]})",
            (document_ids.dtype, tuple(document_ids.shape)),
        )
    extra = {"window": -1 if window is None else window, "document_ids (rows, or -1)": -1 if document_ids is None else document_ids.shape[0]}
    return document_ids, extra
