"""Rewrite every SDPA node of a captured graph into primitive ATen ops.

Each ``scaled_dot_product_attention`` becomes, in ``(B, H, S, D)`` layout::

    [repeat_interleave K, V heads (GQA)] -> transpose K -> matmul Q K^T -> mul scale
    -> [add causal -inf triangle | add float mask | where(bool mask, scores, -inf)]
    -> softmax (``_safe_softmax`` when masked: fully masked rows give 0, as SDPA does)
    -> [dropout, only if the capture had dropout_p > 0] -> matmul P V

``nn.MultiheadAttention`` needs no case of its own: torch.export (eval, no grad; checked on
2.13) lowers it to plain ops around one SDPA node (or a bmm-softmax-bmm chain when it returns
weights), never to the fused ``_native_multi_head_attention``. The ``_scaled_dot_product_*``
kernels are rewritten too when only their first output (the attention) is used.

New nodes carry ``meta["val"]`` (fake tensors) and the SDPA node's ``nn_module_stack``, so
FLOP counting and module attribution work on the decomposed graph as on the original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from attnkit.errors import check_type
from attnkit.discover.attention import SDPA_OPS, op_name, sdpa_arguments
from attnkit.discover.capture import CapturedGraph

__all__ = ["DecomposedGraph", "decompose_attention"]

aten = torch.ops.aten


@dataclass(frozen=True)
class DecomposedGraph:
    """The captured graph with attention spelled out in primitive ops (see the module docstring)."""

    graph_module: GraphModule
    """Runnable exactly like ``CapturedGraph.graph_module`` (same inputs and outputs); shares its weights."""
    nodes_before: int
    """Nodes in the captured graph."""
    nodes_after: int
    """Nodes in the decomposed graph."""
    replaced: dict[str, tuple[str, ...]]
    """SDPA node name -> names of the primitive nodes that compute it, in order (a copy into the kernel's
    output strides, where they differ, follows them and is not listed)."""

    def __repr__(self) -> str:
        return (
            f"DecomposedGraph(attentions={len(self.replaced)}, nodes {self.nodes_before} -> {self.nodes_after})"
        )


def decompose_attention(captured: CapturedGraph) -> DecomposedGraph:
    """Replace every SDPA node in ``captured`` with primitive ATen ops, in a new GraphModule.

    Hand-written attention (eager models) is already primitive and stays as it is.

    Args:
        captured: from :func:`attnkit.discover.capture.capture`; not modified.

    Returns:
        A :class:`DecomposedGraph`.

    Example::

        decomposed = decompose_attention(captured)
        out = decomposed.graph_module(*captured.example_inputs, **captured.example_kwargs)
    """
    check_type(captured, CapturedGraph, "captured", "Call attnkit.discover.capture.capture(model, inputs) first.")
    original = captured.graph_module
    graph = Graph()
    graph.output(graph.graph_copy(original.graph, {}))
    graph._codegen = original.graph._codegen  # pytree in/out convention; read-only here
    replaced = {}
    for node in list(graph.nodes):
        if op_name(node) in SDPA_OPS and (out := _output_user(node)) is not None:
            with graph.inserting_before(node):
                new_nodes, result = _decompose(graph, node, out.meta["val"])
            out.replace_all_uses_with(result)
            for dead in [*node.users, node]:  # the SDPA node and its (now unused) getitems
                graph.erase_node(dead)
            replaced[node.name] = tuple(new.name for new in new_nodes)
    graph.lint()
    graph_module = GraphModule(original, graph)
    for spec in ("_in_spec", "_out_spec"):  # the pytree calling convention of ExportedProgram.module()
        if hasattr(original, spec):
            setattr(graph_module, spec, getattr(original, spec))
    graph_module.recompile()
    return DecomposedGraph(graph_module, len(original.graph.nodes), len(graph.nodes), replaced)


def _output_user(node: Node) -> Node | None:
    """The node carrying the attention output: the SDPA node, or ``getitem(node, 0)`` of the
    ``_scaled_dot_product_*`` kernels; None when their other outputs (LSE...) are used."""
    if op_name(node) == "scaled_dot_product_attention":
        return node
    outputs = [user for user in node.users if op_name(user) == "getitem" and user.args[1] == 0]
    others_used = any(user.users for user in node.users if user not in outputs)
    return outputs[0] if len(outputs) == 1 and not others_used else None


def _decompose(graph: Graph, sdpa: Node, like: torch.Tensor) -> tuple[list[Node], Node]:
    """``(the primitive nodes computing sdpa's output, the node holding it laid out like like)``; the
    layout nodes (a copy into the kernel's strides, where they differ) are not among the first."""
    arguments = sdpa_arguments(sdpa)
    q, k, v, mask = arguments["query"], arguments["key"], arguments["value"], arguments["attn_mask"]
    q_shape, k_shape = q.meta["val"].shape, k.meta["val"].shape
    seq_q, seq_kv, head_dim = q_shape[-2], k_shape[-2], q_shape[-1]
    scale = arguments["scale"] if arguments["scale"] is not None else 1.0 / math.sqrt(head_dim)
    emit = _Emitter(graph, sdpa)
    if q.meta["val"].dim() >= 3 and k_shape[-3] != q_shape[-3]:  # GQA: query head h uses KV head h // group
        group = q_shape[-3] // k_shape[-3]
        k = emit(aten.repeat_interleave.self_int, k, group, -3)
        v = emit(aten.repeat_interleave.self_int, v, group, -3)
    scores = emit(aten.matmul.default, q, emit(aten.transpose.int, k, -2, -1))
    scores = emit(aten.mul.Tensor, scores, scale)
    if arguments["is_causal"]:  # SDPA's is_causal is top-left aligned: key j allowed iff j <= i
        dtype, device = q.meta["val"].dtype, q.meta["val"].device
        full = emit(aten.full.default, [seq_q, seq_kv], -math.inf, dtype=dtype, device=device)
        scores = emit(aten.add.Tensor, scores, emit(aten.triu.default, full, 1))
    if mask is not None and mask.meta["val"].dtype == torch.bool:
        scores = emit(aten.where.ScalarOther, mask, scores, -math.inf)
    elif mask is not None:
        scores = emit(aten.add.Tensor, scores, mask)
    masked = arguments["is_causal"] or mask is not None
    probabilities = emit(aten._safe_softmax.default if masked else aten.softmax.int, scores, -1)
    if arguments["dropout_p"] > 0:
        probabilities = emit(aten.dropout.default, probabilities, arguments["dropout_p"], True)
    out = emit(aten.matmul.default, probabilities, v)
    steps = list(emit.nodes)
    return steps, _match_layout(emit, out, like)


def _match_layout(emit: "_Emitter", out: Node, like: torch.Tensor) -> Node:
    """Give the decomposed output the kernel's memory layout, a permutation of a dense tensor (SDPA's CPU
    and CUDA kernels return (B, S, H, D)-major outputs): the captured code after it may rely on those
    strides (torch 2.11's export views the output's transpose, which only that layout allows)."""
    got = out.meta["val"]
    sizes, strides = like.shape, like.stride()
    if not all(isinstance(n, int) for n in (*sizes, *strides)):  # symbolic shapes: no layout to match
        return out
    if all(a == b for size, a, b in zip(sizes, strides, got.stride()) if size > 1):
        return out
    order = sorted(range(like.dim()), key=lambda d: (-strides[d], d))  # outermost dimension first
    dense = emit(aten.clone.default, emit(aten.permute.default, out, order), memory_format=torch.contiguous_format)
    return emit(aten.permute.default, dense, [order.index(d) for d in range(like.dim())])


class _Emitter:
    """Adds call_function nodes at the graph's insertion point, with fake values and module metadata."""

    def __init__(self, graph: Graph, source: Node):
        self.graph, self.nodes = graph, []
        self.fake_mode = source.args[0].meta["val"].fake_mode  # the query's; SDPA kernels return tuples
        self.meta = {key: source.meta[key] for key in ("nn_module_stack", "stack_trace") if key in source.meta}

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> Node:
        node = self.graph.call_function(target, args, kwargs)
        fake_args, fake_kwargs = torch.fx.node.map_arg((args, kwargs), lambda arg: arg.meta["val"])
        with self.fake_mode:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
        node.meta.update(self.meta)
        self.nodes.append(node)
        return node
