"""Shapes without data: put a ``meta``-device model and inputs on fake CPU tensors before export.

A model built on ``meta`` (``build_model(..., device="meta")``) holds no data, so any size costs
nothing. Exporting it on ``meta`` would trace the meta kernels, whose output layouts differ from the
CPU kernels' (SDPA's output strides, hence an extra ``contiguous`` copy), so the graph would differ
from a real model's. Fake tensors that claim the CPU device trace the CPU's layouts with no storage:
the captured graph is node for node the one a real CPU model gives.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["has_meta", "fake_cpu_copy"]


def has_meta(model: torch.nn.Module, inputs: Any, kwargs: Any) -> bool:
    """Whether any parameter, buffer or input tensor of the call lives on the ``meta`` device."""
    tensors = [*model.parameters(), *model.buffers(), *tree_flatten((inputs, kwargs))[0]]
    return any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors)


def fake_cpu_copy(model: torch.nn.Module, inputs: tuple, kwargs: dict) -> tuple[torch.nn.Module, tuple, dict]:
    """A copy of ``model`` whose parameters and buffers, and copies of the inputs, are fake CPU tensors
    of one :class:`FakeTensorMode` (same shapes, strides, dtypes; no storage). Tied weights stay tied.
    ``model`` is not changed."""
    mode = FakeTensorMode()
    made: dict[int, torch.Tensor] = {}

    def fake(tensor: Any) -> Any:
        if not isinstance(tensor, torch.Tensor):
            return tensor
        if id(tensor) not in made:
            with mode:
                made[id(tensor)] = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu")
        return made[id(tensor)]

    copied = copy.deepcopy(model)  # on meta: structure only
    parameters: dict[int, torch.nn.Parameter] = {}
    for module in copied.modules():
        for name, parameter in module._parameters.items():
            if parameter is not None:
                if id(parameter) not in parameters:
                    parameters[id(parameter)] = torch.nn.Parameter(fake(parameter), requires_grad=parameter.requires_grad)
                module._parameters[name] = parameters[id(parameter)]
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = fake(buffer)
    return copied, tree_map(fake, inputs), tree_map(fake, kwargs)
