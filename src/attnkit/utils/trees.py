"""The one pytree cast: move and cast the tensors inside nested inputs, leave everything else.

Model inputs come as tuples, lists, dicts and ``ModelOutput``s of tensors, token ids and Python
values; every command that re-runs a model in another dtype or on another device walks them here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map

__all__ = ["cast_floating", "outside_inference"]


def cast_floating(tree: Any, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Any:
    """``tree`` with floating tensors cast to ``dtype`` and every tensor moved to ``device``.

    Integer and bool tensors (token ids, masks) keep their dtype; None for ``dtype`` or ``device``
    keeps that property; non-tensor leaves and the containers' types are kept (``torch.utils._pytree``).
    Tensors already right are returned as they are, not copied.
    """

    def move(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        cast = dtype is not None and value.is_floating_point()
        return value.to(device=device, dtype=dtype if cast else value.dtype)

    return tree_map(move, tree)


def outside_inference(tree: Any) -> Any:
    """``tree`` with every ``inference_mode`` tensor replaced by a normal copy (others kept as they are).

    Inputs made under ``torch.inference_mode()`` cannot be saved for a backward pass, which an
    equivalence check of gradients needs; call it outside inference mode (the copies are normal there).
    """
    return tree_map(lambda value: value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value, tree)
