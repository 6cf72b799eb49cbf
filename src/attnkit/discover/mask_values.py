"""Values of graph nodes on the captured example: only where they exist and are cheap.

Attention discovery needs mask values (is a materialised mask causal? does a padding mask mask
anything?). They are computed by running only the nodes a mask depends on, and only when that is
cheap and possible: no input or weight without data (``meta`` or fake tensors), nothing traced on
``meta``, no tensor over :data:`MASK_VALUE_BUDGET` elements. Otherwise the caller reads them on a
short real-valued probe of the same model (:func:`attnkit.discover.attention.find_attention`).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import Node

from attnkit.discover.capture import CapturedGraph

__all__ = ["MASK_VALUE_BUDGET", "evaluable", "evaluate"]

MASK_VALUE_BUDGET = 1 << 22
"""Largest tensor (elements) computed to read mask values on the example: a 2048 x 2048 mask (the
nodes on the way, int64 index grids among them, stay far below a gigabyte)."""


def _needed(targets: list[Node]) -> set[Node]:
    """``targets`` and every node they depend on."""
    needed, stack = set(), list(targets)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    return needed


def _placeholder_values(captured: CapturedGraph) -> dict[Node, Any]:
    graph_module = captured.graph_module
    flat = torch.fx._pytree.tree_flatten_spec((captured.example_inputs, captured.example_kwargs), graph_module._in_spec)
    return dict(zip((node for node in graph_module.graph.nodes if node.op == "placeholder"), flat))


def _has_data(value: Any) -> bool:
    return not isinstance(value, torch.Tensor) or not (value.is_meta or isinstance(value, FakeTensor))


def evaluable(captured: CapturedGraph, targets: list[Node]) -> bool:
    """Whether ``targets`` can be computed cheaply on real data: every input and weight they depend on holds
    data, nothing on the way was traced on ``meta`` (factories there make no data either), and no tensor
    on the way exceeds :data:`MASK_VALUE_BUDGET` elements."""
    needed = _needed(targets)
    inputs = _placeholder_values(captured)
    for node in needed:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and (value.numel() > MASK_VALUE_BUDGET or value.device.type == "meta"):
            return False
        if node.op == "placeholder" and not _has_data(inputs.get(node)):
            return False
        if node.op == "get_attr" and not _has_data(operator.attrgetter(node.target)(captured.graph_module)):
            return False
    return True


def evaluate(captured: CapturedGraph, targets: list[Node]) -> dict[Node, torch.Tensor]:
    """Values of ``targets`` on the example inputs, running only the nodes they depend on.

    The nodes run where the model lives (factory nodes carry the device they were traced on);
    the results are copied to the CPU so the mask analysis never mixes devices.
    """
    needed = _needed(targets)
    graph_module = captured.graph_module
    env = _placeholder_values(captured)
    with torch.no_grad():
        for node in graph_module.graph.nodes:
            if node not in needed or node in env:
                continue
            if node.op == "get_attr":
                env[node] = operator.attrgetter(node.target)(graph_module)
            else:
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
                env[node] = node.target(*args, **kwargs)
    return {node: env[node].detach().cpu() if isinstance(env[node], torch.Tensor) else env[node] for node in targets}
