"""What a model's tensors say about it: the dtype it computes in and the device it sits on."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["model_dtype", "model_device"]


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the first floating parameter, else of the first floating buffer, else torch's default dtype.

    Example: ``model_dtype(nn.Linear(4, 4).bfloat16()) == torch.bfloat16``.
    """
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def model_device(model: nn.Module) -> torch.device:
    """The device of the first parameter, else of the first buffer, else the CPU."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")
