"""FLOPs and bytes of each ATen node of a captured graph, at the analysis dtype.

Conventions (stated in every report):

* 2 FLOPs per multiply-add. Only matrix multiplies, convolutions and attention are
  counted as FLOPs; elementwise ops, norms and softmax count as memory traffic only
  (as ``torch.utils.flop_counter.FlopCounterMode`` does).
* Attention forward = ``2*B*Hq*Sq*Skv*(Dqk+Dv)`` (``4*B*H*Sq*Skv*D`` when Dqk == Dv),
  counted by us from the shapes (FlopCounterMode misses SDPA on CPU). Causal attention is
  halved in ``flops``; ``dense_flops`` keeps the non-causal count.
* Bytes: every floating-point tensor is counted at the analysis dtype's item size;
  integer and bool tensors at their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch.fx import Node

from attnkit.discover.attention import SDPA_OPS, op_name, sdpa_arguments

__all__ = [
    "FLOP_CONVENTION", "CATEGORIES", "OpCost", "count_ops", "op_category", "node_flops", "node_reads", "node_writes",
    "tensor_bytes", "resolve", "layer_of",
]

FLOP_CONVENTION = (
    "2 FLOPs per multiply-add; matmul, convolution and attention only; "
    "attention = 2*B*Hq*Sq*Skv*(Dqk+Dv), causal attention halved"
)

_VIEWS = {
    "view", "_unsafe_view", "transpose", "permute", "t", "numpy_T", "mT", "expand", "expand_as", "broadcast_to",
    "unsqueeze", "squeeze", "select", "slice", "split", "split_with_sizes", "chunk", "unbind", "narrow", "as_strided",
    "alias", "detach", "view_as", "movedim", "diagonal", "getitem", "lift_fresh_copy",
}
_MAYBE_COPY = {"reshape", "flatten", "unflatten", "contiguous"}  # a view unless the layout forbids it
_NOOPS = {"dropout", "feature_dropout", "alpha_dropout", "empty", "empty_like", "new_empty", "empty_strided"}
_FACTORIES = {
    "arange", "zeros", "ones", "full", "new_ones", "new_zeros", "new_full", "scalar_tensor", "zeros_like",
    "ones_like", "full_like", "tensor", "linspace", "tril_indices", "triu_indices", "eye",
}
_GEMMS = {"linear", "addmm", "mm", "bmm", "baddbmm", "matmul", "einsum", "addbmm"}
_CONVS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
          "conv_transpose3d"}
_REDUCTIONS = {
    "layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "softmax", "_softmax", "log_softmax",
    "_log_softmax", "mean", "sum", "amax", "amin", "max", "min", "var", "var_mean", "std", "cumsum", "argmax",
    "argmin", "logsumexp", "group_norm", "native_group_norm", "batch_norm", "native_batch_norm",
    "_native_batch_norm_legit_no_training", "norm", "linalg_vector_norm", "prod", "any", "all", "topk", "sort",
}
_GATHERS = {"embedding", "index_select", "gather", "index", "take"}
_COPIES = {"clone", "cat", "stack", "copy", "constant_pad_nd", "pad", "repeat", "tril", "triu", "roll", "flip"}

#: Categories. "view" and "noop" never launch a kernel; "relayout" is a reshape whose input layout
#: forces a copy in eager mode (a fusing compiler folds it into the consumer's indexing).
CATEGORIES = (
    "gemm", "conv", "attention", "reduction", "gather", "pointwise", "copy", "factory", "relayout", "view", "noop",
)


@dataclass(frozen=True)
class OpCost:
    """FLOPs and bytes of one ATen node when it runs as its own kernel."""

    node: str
    """Node name in ``graph_module.graph``."""
    op: str
    """Short operator name, e.g. ``"linear"``."""
    category: str
    """One of :data:`CATEGORIES`."""
    flops: int
    """FLOPs with causal attention halved."""
    dense_flops: int
    """FLOPs with attention counted non-causal."""
    bytes_read: int
    """Bytes read from the node's tensor inputs (weights included)."""
    bytes_written: int
    """Bytes of the node's outputs."""
    layer: str
    """Module path of the repeated block holding the node (e.g. ``encoder.layer.3``), or the top module."""

    def to_json(self) -> dict:
        return asdict(self)


def _val(node) -> object:
    return node.meta.get("val") if isinstance(node, Node) else None


def _tensors(value) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def tensor_bytes(value, dtype: torch.dtype) -> int:
    """Bytes of a tensor (or nested tuple of tensors); floating tensors at ``dtype``'s item size."""
    total = 0
    for tensor in _tensors(value):
        size = dtype.itemsize if tensor.is_floating_point() else tensor.dtype.itemsize
        total += int(tensor.numel()) * size
    return total


def _is_view_possible(node: Node) -> bool:
    source, out = _val(node.args[0]), _val(node)
    if not isinstance(source, torch.Tensor) or not isinstance(out, torch.Tensor):
        return True
    if source.is_contiguous():
        return True
    try:
        torch.empty_strided(source.shape, source.stride(), device="meta").view(out.shape)
    except RuntimeError:
        return False
    return True


def op_category(node: Node) -> str:
    """The :data:`CATEGORIES` entry of a ``call_function`` node (views and no-ops launch nothing)."""
    name = op_name(node)
    if name in _VIEWS or name.startswith(("_assert", "sym_")) or not isinstance(_val(node), (torch.Tensor, tuple, list)):
        return "view" if name in _VIEWS else "noop"
    if name in _MAYBE_COPY:
        return "view" if _is_view_possible(node) else "relayout"
    if name in _NOOPS:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False)
        return "pointwise" if name.endswith("dropout") and train else "noop"
    if name in ("to", "_to_copy", "type_as"):
        source, out = _val(node.args[0]), _val(node)
        same = isinstance(source, torch.Tensor) and source.dtype == out.dtype and source.device == out.device
        return "noop" if same else "pointwise"
    for category, names in (
        ("gemm", _GEMMS), ("conv", _CONVS), ("attention", SDPA_OPS), ("reduction", _REDUCTIONS),
        ("gather", _GATHERS), ("copy", _COPIES), ("factory", _FACTORIES),
    ):
        if name in names:
            return category
    return "pointwise"


def _matmul_flops(node: Node, name: str) -> int:
    out = _val(node)
    out = out[0] if isinstance(out, (tuple, list)) else out
    if name == "einsum":
        return _einsum_flops(node.args[0], [_val(a) for a in node.args[1]], out)
    first = _val(node.args[1] if name in ("addmm", "baddbmm", "addbmm") else node.args[0])
    inner = first.shape[-1]
    if name == "addbmm":
        return 2 * first.shape[0] * int(out.numel()) * inner
    return 2 * int(out.numel()) * int(inner)


def _einsum_flops(equation: str, operands: list, out: torch.Tensor) -> int:
    """2 x the product of every index size; dims under ``...`` come from the output."""
    inputs, _, result = equation.replace(" ", "").partition("->")
    sizes: dict[str, int] = {}
    for term, tensor in zip(inputs.split(","), operands):
        letters = term.replace("...", "")
        sizes.update(zip(letters, tensor.shape[len(tensor.shape) - len(letters):]))
    ellipsis = out.shape[: out.dim() - len(result.replace("...", ""))] if "..." in result else ()
    return 2 * math.prod(sizes.values()) * math.prod(ellipsis)


def _conv_flops(node: Node) -> int:
    """2 x multiply-adds: each output element of a convolution (weight ``(Cout, Cin/g, *k)``) reads
    ``Cin/g * prod(k)`` weights; each *input* element of a transposed one (weight ``(Cin, Cout/g, *k)``)
    is spread over ``Cout/g * prod(k)`` outputs."""
    name, weight = op_name(node), _val(node.args[1])
    transposed = name.startswith("conv_transpose") or (
        name in ("convolution", "_convolution") and len(node.args) > 6 and bool(node.args[6]))
    elements = _val(node.args[0]).numel() if transposed else _val(node).numel()
    return 2 * int(elements) * int(math.prod(weight.shape[1:]))


def _attention_flops(node: Node) -> tuple[int, int]:
    arguments = sdpa_arguments(node)
    q, k, v = (_val(arguments[name]) for name in ("query", "key", "value"))
    dense = 2 * math.prod(q.shape[:-2]) * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return (dense // 2 if arguments["is_causal"] else dense), dense


def node_flops(node: Node, causal_nodes: frozenset[str] = frozenset()) -> tuple[int, int]:
    """``(flops, dense_flops)`` of one node; attention and matmuls named in ``causal_nodes`` are halved."""
    category = op_category(node)
    if category == "gemm":
        dense = _matmul_flops(node, op_name(node))
        return (dense // 2 if node.name in causal_nodes else dense), dense
    if category == "conv":
        dense = _conv_flops(node)
        return dense, dense
    if category == "attention":
        flops, dense = _attention_flops(node)
        return (dense // 2 if node.name in causal_nodes else flops), dense
    return 0, 0


def resolve(node: Node, is_free: Callable[[Node], bool]) -> Node:
    """The node whose memory ``node`` aliases: follow free (view-like) ops back to a producer."""
    while node.op == "call_function" and is_free(node) and node.args and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def node_reads(node: Node, dtype: torch.dtype, is_free: Callable[[Node], bool]) -> dict[str, int]:
    """Bytes ``node`` reads, keyed by the producer each input aliases (views resolved, capped at its size).

    Gathers (embedding, index) read only the rows they return from their table.
    """
    reads: dict[str, int] = {}
    gather = op_category(node) == "gather"
    out_bytes = tensor_bytes(_val(node), dtype)
    inputs = [a for a in (*node.args, *node.kwargs.values()) for a in (a if isinstance(a, (list, tuple)) else [a])]
    for position, arg in enumerate(a for a in inputs if isinstance(a, Node) and isinstance(_val(a), torch.Tensor)):
        base = resolve(arg, is_free)
        seen = tensor_bytes(_val(arg), dtype)
        if gather and position == 0:  # the table: only the gathered rows are read
            seen = min(seen, out_bytes)
        cap = tensor_bytes(_val(base), dtype)
        reads[base.name] = min(cap, reads.get(base.name, 0) + min(seen, cap))
    return reads


def node_writes(node: Node, dtype: torch.dtype) -> int:
    """Bytes of the node's outputs."""
    return tensor_bytes(_val(node), dtype)


def layer_of(node: Node) -> str:
    """Path of the repeated block holding ``node``: the module path cut after its first numeric part."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "(top)"
    path = list(stack.values())[-1][0]
    parts = [p for p in path.replace("L['self'].", "").split(".") if p]
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return ".".join(parts[:2]) or "(top)"


def count_ops(graph: torch.fx.Graph, dtype: torch.dtype, causal_nodes: Iterable[str] = ()) -> list[OpCost]:
    """Per-node FLOPs and bytes of every ``call_function`` node, in execution order.

    Args:
        graph: the captured ATen graph (``CapturedGraph.graph_module.graph``).
        dtype: the analysis dtype; floating tensors are counted at its item size.
        causal_nodes: attention and matmul nodes of causal attention sites (their FLOPs are halved;
            SDPA nodes with ``is_causal=True`` are halved anyway).
    Returns:
        One :class:`OpCost` per ``call_function`` node. Views count no bytes.
    """
    causal = frozenset(causal_nodes)
    costs = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        category = op_category(node)
        free = category in ("view", "noop")
        flops, dense = node_flops(node, causal)
        read = 0 if free else sum(node_reads(node, dtype, _eager_free).values())
        written = 0 if free else node_writes(node, dtype)
        costs.append(OpCost(node.name, op_name(node), category, flops, dense, read, written, layer_of(node)))
    return costs


def _eager_free(node: Node) -> bool:
    return op_category(node) in ("view", "noop")
