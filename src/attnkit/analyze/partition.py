"""Partition an ATen graph into the kernels that would launch, under three execution models.

* ``eager``: every op that is not a view or a no-op launches one kernel (PyTorch eager).
* ``compiled``: ``torch.compile`` in its default mode. Views, reshapes and factories cost
  nothing on their own; chains of pointwise ops, gathers and reductions fuse into one Triton
  kernel; GEMMs (cuBLAS), convolutions and SDPA stay separate kernels (inductor does not fuse
  GEMM epilogues by default; ``PartitionConfig(epilogue_fusion=True)`` models a compiler that does).
* ``attention-aware``: ``compiled`` plus one flash-style kernel per attention site (hand-written
  matmul-softmax-matmul chains collapse) and one GEMM for separate Q/K/V projections that share
  an input (packed projections are already one GEMM).

Host-side counts for the cost model: ``host_ops`` (ATen ops the host dispatches) and
``module_calls`` (``nn.Module`` calls in an eager forward, from the nodes' module stacks).

Bytes moved by a kernel = its external inputs (weights included) + the outputs used outside it,
at the analysis dtype (see :mod:`attnkit.analyze.flops`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch.fx import Graph, Node

from attnkit.errors import check_arg
from attnkit.discover.attention import op_name, sdpa_arguments
from attnkit.analyze.flops import layer_of, node_flops, node_reads, node_writes, op_category, resolve

__all__ = ["MODES", "PartitionConfig", "Kernel", "Partition", "partition", "fusion_steps"]

MODES = ("eager", "compiled", "attention-aware")
_ANCHORS = ("gemm", "conv", "attention")
_ALWAYS_FREE = ("view", "noop")


@dataclass(frozen=True)
class PartitionConfig:
    """Which fusions the execution model performs. Use :meth:`from_mode` for the three presets."""

    mode: str
    """``"eager"``, ``"compiled"`` or ``"attention-aware"`` (the label in reports)."""
    fuse_pointwise: bool = False
    """Fuse chains of pointwise ops, gathers and reductions; views, reshapes and factories are free."""
    epilogue_fusion: bool = False
    """Fuse pointwise consumers of a GEMM or convolution into it."""
    attention_fusion: bool = False
    """Collapse every attention site into one flash-style kernel."""
    qkv_fusion: bool = False
    """Merge separate Q/K/V projection GEMMs that read the same input into one GEMM."""

    def __post_init__(self):
        check_arg(self.mode in MODES, "mode", f"one of {MODES}", self.mode)

    @classmethod
    def from_mode(cls, mode: str) -> "PartitionConfig":
        """The preset for ``mode``: eager fuses nothing; compiled fuses pointwise/reduction chains (no GEMM
        epilogues, as torch.compile's default); attention-aware adds flash attention and the Q/K/V merge."""
        check_arg(mode in MODES, "mode", f"one of {MODES}", mode)
        aware = mode == "attention-aware"
        return cls(mode, fuse_pointwise=mode != "eager", attention_fusion=aware, qkv_fusion=aware)


def fusion_steps() -> list[tuple[str, PartitionConfig]]:
    """The fusions in the order they are applied, each with the config that adds it (for savings)."""
    eager = PartitionConfig.from_mode("eager")
    compiled = replace(eager, mode="compiled", fuse_pointwise=True)
    flash = replace(compiled, mode="attention-aware", attention_fusion=True)
    return [
        ("eager", eager),
        ("free views + pointwise/reduction chains", compiled),
        ("flash attention per site", flash),
        ("Q/K/V projection merge", replace(flash, qkv_fusion=True)),
    ]


@dataclass(frozen=True)
class Kernel:
    """One launched kernel: a subgraph of ATen nodes."""

    name: str
    """Operator names joined by ``+``, e.g. ``"linear+gelu"``."""
    category: str
    """``gemm``, ``conv``, ``attention``, ``qkv-gemm`` or the category of a fused chain's first op."""
    ops: tuple[str, ...]
    """Node names in execution order."""
    flops: int
    """FLOPs (causal attention halved)."""
    bytes: int
    """Bytes moved: external inputs + outputs used outside the kernel."""
    weight_bytes: int
    """Bytes of parameters and buffers among the inputs."""
    layer: str
    """Repeated block holding the kernel's first op, e.g. ``encoder.layer.3``."""
    seq_kv: int = 0
    """Keys per query of an attention kernel (its rate depends on it); 0 for other kernels."""
    misaligned: bool = False
    """A GEMM with an operand whose row length (leading dimension, e.g. N = 50257 of a vocabulary
    projection) is not a multiple of 16 bytes: cuBLAS cannot use its aligned tensor-core kernels."""

    @property
    def intensity(self) -> float:
        """Arithmetic intensity in FLOPs per byte."""
        return self.flops / self.bytes if self.bytes else 0.0

    def __repr__(self) -> str:
        return f"Kernel({self.name!r}, ops={len(self.ops)}, GFLOP={self.flops / 1e9:.3f}, MB={self.bytes / 1e6:.2f})"

    def to_json(self) -> dict:
        return {**asdict(self), "ops": list(self.ops), "intensity": self.intensity}


@dataclass(frozen=True)
class Partition:
    """The kernels one forward launches under an execution model."""

    config: PartitionConfig
    kernels: tuple[Kernel, ...]
    host_ops: int
    """Ops the host dispatches per forward (eager: every non-no-op ATen call; compiled: one per kernel)."""
    module_calls: int = 0
    """``nn.Module`` calls of an eager forward (0 for compiled modes, whose wrapper calls no modules)."""
    qkv: dict = field(default_factory=dict)
    """Q/K/V projections: ``{"packed": sites with one GEMM, "separate": sites with several,
    "merged": GEMM groups merged}``."""

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def total_flops(self) -> int:
        return sum(k.flops for k in self.kernels)

    @property
    def total_bytes(self) -> int:
        return sum(k.bytes for k in self.kernels)

    def __repr__(self) -> str:
        return f"Partition({self.mode!r}, kernels={len(self.kernels)}, GB={self.total_bytes / 1e9:.3f})"

    def to_json(self) -> dict:
        return {
            "mode": self.mode, "config": asdict(self.config), "num_kernels": len(self.kernels),
            "total_flops": self.total_flops, "total_bytes": self.total_bytes, "host_ops": self.host_ops,
            "module_calls": self.module_calls,
            "qkv": dict(self.qkv), "kernels": [k.to_json() for k in self.kernels],
        }


def partition(graph: Graph, dtype: torch.dtype, config: PartitionConfig | str, *, sites: Sequence = (),
              causal_nodes: Iterable[str] = ()) -> Partition:
    """Split ``graph`` into kernels under ``config`` (a :class:`PartitionConfig` or a mode name).

    Args:
        graph: the captured ATen graph (``CapturedGraph.graph_module.graph``).
        dtype: analysis dtype for bytes.
        config: execution model.
        sites: attention sites from ``find_attention`` (for attention fusion and the Q/K/V merge).
        causal_nodes: attention/matmul nodes whose FLOPs are halved (causal sites).
    Returns:
        A :class:`Partition`; kernels in launch order.
    """
    config = PartitionConfig.from_mode(config) if isinstance(config, str) else config
    nodes = [n for n in graph.nodes if n.op == "call_function"]
    category = {n: op_category(n) for n in nodes}
    free_set = frozenset(_ALWAYS_FREE) | ({"relayout"} if config.fuse_pointwise else set())
    alive = _alive(graph) if config.fuse_pointwise else set(nodes)  # a compiler drops dead code; eager runs it
    live = [n for n in nodes if category[n] not in free_set and n in alive]
    forced, qkv = _forced_groups(graph, sites, config)
    groups = _group(live, category, config, forced, free_set)
    causal = frozenset(causal_nodes)
    kernels = tuple(_kernel(group, category, dtype, free_set, causal) for group in groups)
    if config.fuse_pointwise:
        return Partition(config, kernels, len(kernels), 0, qkv)
    return Partition(config, kernels, sum(category[n] != "noop" for n in nodes), _module_calls(nodes), qkv)


def _module_calls(nodes: list[Node]) -> int:
    """The root call plus the distinct submodules on the nodes' ``nn_module_stack`` (one call each)."""
    return 1 + len({key for node in nodes for key in (node.meta.get("nn_module_stack") or {})})


def _alive(graph: Graph) -> set[Node]:
    """Nodes whose result reaches the graph output."""
    alive: set[Node] = set()
    for node in reversed(graph.nodes):
        if node.op == "output" or any(user in alive for user in node.users):
            alive.add(node)
    return alive


def _producers(node: Node, is_free) -> list[Node]:
    found = []
    for arg in node.all_input_nodes:
        base = resolve(arg, is_free)
        if base.op == "call_function" and not is_free(base) and base not in found:
            found.append(base)
    return found


def _forced_groups(graph: Graph, sites: Sequence, config: PartitionConfig) -> tuple[dict[str, str], dict]:
    """Node name -> forced group key, for attention fusion and Q/K/V merges."""
    forced: dict[str, str] = {}
    qkv = {"merged": 0, "packed": 0, "separate": 0}
    by_name = {n.name: n for n in graph.nodes}
    for index, site in enumerate(sites):
        if config.attention_fusion:
            forced.update({name: f"attention{index}" for name in site.core})
        names = list(dict.fromkeys(site.projections.get(r) for r in ("q", "k", "v") if site.projections.get(r) in by_name))
        if len(names) <= 1:  # one GEMM makes Q, K and V (or K and V): already fused
            qkv["packed"] += bool(names)
            continue
        qkv["separate"] += 1
        shared: dict[str, list[str]] = {}
        for name in names:
            shared.setdefault(_activation_source(by_name[name]), []).append(name)
        for source, members in shared.items():
            if len(members) > 1 and config.qkv_fusion:
                qkv["merged"] += 1
                forced.update({m: f"qkv{index}:{source}" for m in members})
    return forced, qkv


def _activation_source(gemm: Node) -> str:
    """Name of the tensor a projection GEMM multiplies (views resolved), to find projections sharing it."""
    data = gemm.args[1] if op_name(gemm) in ("addmm", "baddbmm") else gemm.args[0]
    return resolve(data, lambda n: op_category(n) in _ALWAYS_FREE).name if isinstance(data, Node) else gemm.name


class _Group:
    __slots__ = ("members", "kind", "anchor_numels", "successors", "has_reduction")

    def __init__(self, kind: str):
        self.members: list[Node] = []
        self.kind = kind
        self.anchor_numels: set[int] = set()  # output sizes of its GEMMs: an epilogue must match one
        self.successors: set[int] = set()
        self.has_reduction = False


def _numel(node: Node) -> int:
    val = node.meta.get("val")
    return int(val.numel()) if isinstance(val, torch.Tensor) else 0


def _free_test(category: dict, free_set: frozenset[str]):
    """Predicate: does this node launch nothing in the mode (placeholders and weights count as free)?"""
    return lambda node: category.get(node, "noop") in free_set


def _group(live: list[Node], category: dict, config: PartitionConfig, forced: dict[str, str],
           free_set: frozenset[str]) -> list[_Group]:
    """Greedy fusion in execution order; a join is refused if it would create a cycle between groups."""
    is_free = _free_test(category, free_set)
    groups: list[_Group] = []
    owner: dict[Node, int] = {}
    keyed: dict[str, int] = {}

    def reaches(start: int, goal: int) -> bool:
        stack, seen = [start], {start}
        while stack:
            current = stack.pop()
            if current == goal:
                return True
            for nxt in groups[current].successors - seen:
                seen.add(nxt)
                stack.append(nxt)
        return False

    def legal(target: int, inputs: set[int]) -> bool:
        return all(not reaches(target, other) for other in inputs if other != target)

    for node in live:
        kind = category[node]
        inputs = {owner[p] for p in _producers(node, is_free) if p in owner}
        key = forced.get(node.name)
        target = keyed.get(key) if key else None
        if target is None and not key and config.fuse_pointwise and kind not in _ANCHORS:
            for candidate in sorted(inputs, reverse=True):
                group = groups[candidate]
                if _accepts(group, kind, node, config) and legal(candidate, inputs):
                    target = candidate
                    break
        if target is None:
            label = ("qkv-gemm" if key.startswith("qkv") else "attention") if key else kind
            groups.append(_Group(label))
            target = len(groups) - 1
            if key:
                keyed[key] = target
        groups[target].members.append(node)
        groups[target].has_reduction |= kind == "reduction"
        if kind in _ANCHORS:
            groups[target].anchor_numels.add(_numel(node))
        owner[node] = target
        for other in inputs - {target}:
            groups[other].successors.add(target)
    return groups


def _accepts(group: _Group, kind: str, node: Node, config: PartitionConfig) -> bool:
    if group.kind in ("gemm", "conv", "qkv-gemm"):
        return config.epilogue_fusion and kind == "pointwise" and _numel(node) in group.anchor_numels
    return group.kind != "attention"


def _kernel(group: _Group, category: dict, dtype: torch.dtype, free_set: frozenset[str],
            causal: frozenset[str]) -> Kernel:
    members = group.members
    inside = {n.name for n in members}
    is_free = _free_test(category, free_set)
    reads: dict[str, int] = {}
    sources: dict[str, Node] = {}
    for node in members:
        sources.update((base.name, base) for base in (resolve(arg, is_free) for arg in node.all_input_nodes))
        for source, size in node_reads(node, dtype, is_free).items():
            if source not in inside:  # an input read by several ops of one kernel is loaded once
                reads[source] = max(reads.get(source, 0), size)
    weights = sum(size for source, size in reads.items() if sources[source].op == "get_attr")
    written = sum(node_writes(n, dtype) for n in members if _used_outside(n, inside, is_free))
    flops = sum(node_flops(n, causal)[0] for n in members)
    names = list(dict.fromkeys(op_name(n) for n in members))
    label = "reduction" if group.kind not in _ANCHORS and group.has_reduction else group.kind
    anchor = next((n for n in members if category[n] in _ANCHORS), members[0])
    return Kernel("+".join(names[:4]) + ("+..." if len(names) > 4 else ""), label, tuple(n.name for n in members),
                  flops, sum(reads.values()) + written, weights, layer_of(anchor),
                  _seq_kv(members, category) if label == "attention" else 0,
                  label in ("gemm", "qkv-gemm") and _misaligned(anchor, dtype))


def _misaligned(gemm: Node, dtype: torch.dtype) -> bool:
    """True if a 2-D+ operand or the output of ``gemm`` has a last dimension that is not a multiple of
    16 bytes (8 elements in 16-bit types, 4 in fp32). Only the last dimension of a row-major tensor is
    its leading dimension, so an odd M (e.g. 197 tokens) is harmless while N = 50257 is not."""
    per_row = max(1, 16 // dtype.itemsize)
    values = [arg.meta.get("val") for arg in gemm.all_input_nodes] + [gemm.meta.get("val")]
    return any(isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[-1] % per_row != 0 for v in values)


def _seq_kv(members: list[Node], category: dict) -> int:
    """Keys per query: SDPA's key length, or the rows of V in a hand-written chain's last matmul."""
    for node in members:
        if category[node] == "attention":
            return int(sdpa_arguments(node)["key"].meta["val"].shape[-2])
    pv = next((n for n in reversed(members) if op_name(n) in ("matmul", "bmm") and len(n.args) > 1), None)
    value = pv.args[1].meta.get("val") if pv is not None and isinstance(pv.args[1], Node) else None
    return int(value.shape[-2]) if isinstance(value, torch.Tensor) and value.dim() >= 2 else 0


def _used_outside(node: Node, inside: set[str], is_free) -> bool:
    stack = list(node.users)
    while stack:
        user = stack.pop()
        if user.op == "output":
            return True
        if user.op != "call_function":
            continue
        if is_free(user):
            stack.extend(user.users)
        elif user.name not in inside:
            return True
    return False
