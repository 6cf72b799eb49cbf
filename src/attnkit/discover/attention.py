"""Find every attention in a captured ATen graph.

Three forms are recognised: SDPA nodes (``aten.scaled_dot_product_attention`` and the
``aten._scaled_dot_product_*`` kernels), hand-written ``matmul -> (scale) -> (soft-cap) -> (mask)
-> softmax -> (dropout) -> matmul`` chains (``attn_implementation="eager"`` models, and
``nn.MultiheadAttention`` when it returns weights), and ``nn.MultiheadAttention`` itself, which
torch.export (checked on 2.13) lowers to one of the other two (named after the module via
``nn_module_stack``). In a chain the GEMMs may be ``matmul``/``bmm``, ``baddbmm`` (its added input
is a bias such as ALiBi, BLOOM) or a batched-matmul ``einsum`` (export keeps ``aten.einsum``);
head reshapes (``view``) may sit between them and the softmax; soft-capping is Gemma 2's
``cap * tanh(scores / cap)``; the scores may be multiplied by a learned per-head factor (Swin v2's
cosine attention) and a bias may be added in place (SpeechT5's ``scores += rel_pos_bias``).

Projections are the nearest GEMMs with a weight parameter above Q, K, V and after the output (the
weight may be transposed in the graph: Falcon's ``x @ W.T``); Q and K from one GEMM, or from GEMMs
on one input, make self attention. K/V heads are counted before any expansion to the query heads
between K's projection and the op (``repeat_kv``, or Falcon's ``broadcast_to`` ahead of RoPE).

Mask values decide causality when the mask is materialised (no ``is_causal`` flag) and whether a
padding mask masks anything. They are read where they exist and are cheap: on the example inputs
when those hold data and every mask is small; otherwise on a *probe*, the same model captured at a
short sequence with real tensors (the mask-building ops are the same at every length, so their
verdict carries over site by site); without either, from the graph alone (see ``mask_evidence``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from torch.fx import Node
from torch.fx.operator_schemas import normalize_function

from attnkit.errors import check_type
from attnkit.discover.capture import CapturedGraph
from attnkit.discover.mask_values import evaluable, evaluate
from attnkit.discover.site import SiteRecord

__all__ = ["AttentionSite", "find_attention", "SDPA_OPS", "sdpa_arguments", "op_name", "unmatched_softmax"]

SDPA_OPS = frozenset(
    {
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    }
)
"""ATen SDPA ops (by packet name) that :func:`find_attention` recognises."""

SOFTMAX = {"softmax", "_softmax", "_safe_softmax"}
_LAYOUT = {
    "view", "reshape", "_unsafe_view", "transpose", "permute", "expand", "unsqueeze", "squeeze",
    "contiguous", "clone", "select", "slice", "getitem", "split", "split_with_sizes", "chunk",
    "unbind", "unflatten", "flatten", "alias", "t", "numpy_T", "mT", "to", "_to_copy", "type_as", "detach",
    "repeat_interleave", "broadcast_to",
}  # fmt: skip
_HEAD_VIEWS = {"view", "_unsafe_view", "reshape"}  # (B*H, S, S) <-> (B, H, S, S) around the softmax (BLOOM)
_PROBABILITY_PASS = {"dropout", "native_dropout", "getitem", "to", "_to_copy", "type_as", "clone", "contiguous", *_HEAD_VIEWS}
_GEMM_2D = {"matmul", "bmm", "baddbmm", "einsum"}
_SEARCH_LIMIT = 64  # nodes visited per projection search; projections sit a few ops away

MaskKind = Literal["none", "causal", "padding", "additive", "bool"]
MaskEvidence = Literal["flag", "values", "probe", "graph"]


@dataclass(frozen=True)
class AttentionSite:
    """One attention in the graph: its shape, masking and the GEMMs around it.

    Node names refer to ``CapturedGraph.graph_module.graph``. :attr:`record` is the shared
    :class:`~attnkit.discover.site.SiteRecord`; the graph's own fields (form, nodes, evidence) stay here.
    """

    name: str
    """Module path of the attention (``""`` for the root module); ``#2``... if a module runs twice."""
    module_type: str
    """Class name of that module, e.g. ``"MultiheadAttention"`` or ``"BertSelfAttention"``."""
    form: Literal["sdpa", "matmul-softmax"]
    """How the graph computes it: one SDPA node, or a hand-written chain."""
    kind: Literal["self", "cross"]
    """``"cross"`` when K/V are projected from a different tensor than Q."""
    causal: bool
    """``is_causal=True`` or a mask that allows no key after the query (bottom-right aligned)."""
    num_heads: int
    num_kv_heads: int
    """Fewer than ``num_heads`` for GQA/MQA (K/V heads expanded or ``enable_gqa``)."""
    head_dim_qk: int
    head_dim_v: int
    batch: int
    seq_q: int
    seq_kv: int
    mask: MaskKind
    """``"causal"``: exactly the causal pattern on the example inputs; ``"padding"``: otherwise
    built from a model input (``attention_mask``) and, where its values are known, hiding whole keys
    only; ``"additive"``/``"bool"``: any other float/bool mask (T5's position bias, ALiBi, a sliding
    window); ``"none"``: no mask, or one that allows everything."""
    dropout_p: float
    """Dropout on the probabilities as captured (0.0 in eval mode)."""
    scale: float
    """Factor applied to ``QK^T`` (``1/sqrt(head_dim_qk)`` unless the model says otherwise)."""
    core: tuple[str, ...]
    """Nodes of the attention core in graph order: head reshapes/transposes, QK^T .. PV (or SDPA)."""
    mask_nodes: tuple[str, ...]
    """Nodes whose values are added to (float) or select (bool) the scores."""
    projections: dict[str, str | None]
    """``{"q","k","v","out"}`` -> name of the GEMM (linear/addmm/mm/matmul) feeding it, or None."""
    qkv_layout: Literal["packed", "separate", "kv-packed", "separate-kv", "unknown"]
    """``packed``: one GEMM makes Q, K and V; ``separate``: three GEMMs on one input;
    ``kv-packed``/``separate-kv``: K and V from one GEMM / two GEMMs (cross attention)."""
    softcap: float = 0.0
    """Logit soft-capping ``scores = softcap * tanh(scores / softcap)`` before the mask (Gemma 2); 0 if none."""
    scale_nodes: tuple[str, ...] = ()
    """Nodes of learned factors the scores are multiplied by, one value per batch or head (Swin v2's
    cosine attention: ``exp(logit_scale)``); ``scale`` is then the constant part."""
    mask_evidence: MaskEvidence = "values"
    """What ``causal`` and ``mask`` were read from: ``"flag"`` (no mask; the ``is_causal`` flag),
    ``"values"`` (the masks' values on the example inputs), ``"probe"`` (their values on the probe
    at a short sequence) or ``"graph"`` (no values: causal only from a flag; ``padding`` if a mask
    comes from a model input, else ``bool``/``additive``)."""

    def __repr__(self) -> str:
        heads = f"{self.num_heads}" if self.num_kv_heads == self.num_heads else f"{self.num_heads}/{self.num_kv_heads}kv"
        return (
            f"AttentionSite({self.name or '<root>'}: {self.kind}{', causal' if self.causal else ''}, "
            f"B={self.batch} H={heads} Sq={self.seq_q} Skv={self.seq_kv} D={self.head_dim_qk}, "
            f"mask={self.mask}{', learned scale' if self.scale_nodes else ''}, qkv={self.qkv_layout}, {self.form})"
        )

    @property
    def record(self) -> SiteRecord:
        """The shared site record (what validate and optimize also produce); graph-only fields stay here."""
        return SiteRecord(
            path=self.name, kind=self.kind, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim_qk=self.head_dim_qk, head_dim_v=self.head_dim_v, batch=self.batch, seq_q=self.seq_q,
            seq_kv=self.seq_kv, mask=self.mask, causal=self.causal, scale=self.scale, dropout_p=self.dropout_p,
            qkv_layout=self.qkv_layout, projections=tuple(self.projections.items()))

    def __hash__(self) -> int:  # projections is a dict; the core nodes identify a site
        return hash((self.name, self.core))

    def to_json(self) -> str:
        """The site as a JSON object string."""
        return json.dumps(asdict(self))


def find_attention(
    captured: CapturedGraph, *, probe: CapturedGraph | Callable[[], CapturedGraph] | None = None
) -> list[AttentionSite]:
    """Every attention in ``captured``, in graph order.

    Args:
        captured: from :func:`attnkit.discover.capture.capture`.
        probe: the same model captured at a short sequence with real tensors (or a function returning
            it, called only when needed): where ``captured`` has no values (``meta`` or fake tensors) or
            masks over :data:`~attnkit.discover.mask_values.MASK_VALUE_BUDGET` elements, mask values are read on it instead.

    Returns:
        One :class:`AttentionSite` per attention.

    Example::

        sites = find_attention(capture(model, (input_ids,), {"use_cache": False}))
        print(sites[0])  # AttentionSite(h.0.attn: self, causal, B=1 H=12 Sq=128 ...)
    """
    check_type(captured, CapturedGraph, "captured", "Call attnkit.discover.capture.capture(model, inputs) first.")
    graph_module = captured.graph_module
    parameters = {name for name, _ in graph_module.named_parameters()}
    cores = _cores(graph_module.graph)
    facts = _mask_facts(captured, cores, probe)
    sites, seen = [], {}
    for core, fact in zip(cores, facts):
        site = _site(core, parameters, fact)
        seen[site.name] = seen.get(site.name, 0) + 1
        if seen[site.name] > 1:
            site = replace(site, name=f"{site.name}#{seen[site.name]}")
        sites.append(site)
    return sites


def _cores(graph: torch.fx.Graph) -> list[_Core]:
    cores = []
    for node in graph.nodes:
        if op_name(node) in SDPA_OPS:
            cores.append(_sdpa_core(node))
        elif op_name(node) in SOFTMAX and (core := _chain_core(node)) is not None:
            cores.append(core)
    return cores


def unmatched_softmax(graph: torch.fx.Graph, sites: list[AttentionSite]) -> int:
    """How many softmax ops of ``graph`` belong to no site in ``sites``: block-sparse or gathered attention
    that matches no pattern here, or a softmax that is not attention (a classifier's)."""
    matched = {name for site in sites for name in site.core}
    return sum(op_name(node) in SOFTMAX and node.name not in matched for node in graph.nodes)


def op_name(node: Node) -> str:
    """The op's packet name (``"view"``, ``"getitem"``, ...) or ``""`` for non-calls."""
    if node.op != "call_function":
        return ""
    target = node.target
    return target.overloadpacket.__name__ if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", "")


def sdpa_arguments(node: Node) -> dict[str, Any]:
    """Arguments of an SDPA node by name: query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa."""
    normalized = normalize_function(node.target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True)
    arguments = dict(normalized.kwargs)
    arguments["attn_mask"] = arguments.pop("attn_bias", arguments.get("attn_mask"))
    defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    return {**defaults, **{key: value for key, value in arguments.items() if value is not None}}


@dataclass
class _Core:
    """The attention op(s) and the Q, K, V, mask tensors that reach them."""

    anchor: Node  # SDPA or softmax node: names the module
    form: str
    q: Node
    k: Node  # for chains: K^T as multiplied
    v: Node
    ops: list[Node]
    out: Node
    masks: list[tuple[Node, str]]  # (mask node, "add" | "keep" | "drop")
    causal: bool
    scale: float | None
    dropout_p: float
    softcap: float = 0.0
    heads: int | None = None  # from a (B, H, Sq, Skv) view of the scores when Q is (B*H, S, D)
    factors: list[Node] = field(default_factory=list)  # learned tensors multiplying the scores


def _sdpa_core(node: Node) -> _Core:
    arguments = sdpa_arguments(node)
    mask = arguments["attn_mask"]
    masks = [] if mask is None else [(mask, "keep" if mask.meta["val"].dtype == torch.bool else "add")]
    out = node
    if op_name(node) != "scaled_dot_product_attention":  # returns a tuple; output 0 is the attention
        out = next(user for user in node.users if op_name(user) == "getitem" and user.args[1] == 0)
    return _Core(
        node, "sdpa", arguments["query"], arguments["key"], arguments["value"], [node] + ([out] if out is not node else []),
        out, masks, bool(arguments["is_causal"]), arguments["scale"], float(arguments["dropout_p"]),
    )  # fmt: skip


def _chain_core(softmax: Node) -> _Core | None:
    """Match ``matmul -> (scale) -> (mask) -> softmax -> (dropout) -> matmul``; None if not attention."""
    if softmax.args[1] not in (-1, softmax.meta["val"].dim() - 1):
        return None
    path = _pv_path(softmax)
    if path is None:
        return None
    *passed, pv = path
    ops, dropout_p = [softmax, *passed], 0.0
    for node in passed:
        if op_name(node) in ("dropout", "native_dropout") and (len(node.args) < 3 or node.args[2]):
            dropout_p = float(node.args[1])
    scores = _trace_scores(softmax.args[0], ops)
    if scores is None:
        return None
    qk, masks, scale, softcap, factors = scores
    if softcap:  # scale was traced up to the tanh, which divides by the cap: cap * tanh(qk * scale / cap)
        scale = (scale or 1.0) * softcap
    q, k = _gemm_operands(qk)
    if op_name(qk) == "baddbmm":  # beta * bias + alpha * Q @ K^T: MultiheadAttention's float mask, BLOOM's ALiBi
        if qk.kwargs.get("beta", 1) != 0:
            masks.append((qk.args[0], "add"))
        scale = (scale or 1.0) * qk.kwargs.get("alpha", 1)
    for operand in (q, k):  # MultiheadAttention scales Q before the matmul
        if op_name(operand) == "mul" and isinstance(operand.args[1], (int, float)):
            scale = (scale or 1.0) * operand.args[1]
            ops.append(operand)
    q, k = (operand.args[0] if operand in ops else operand for operand in (q, k))
    ops += [qk, pv]
    heads = next((_val_shape(n)[-3] for n in ops if op_name(n) in _HEAD_VIEWS and len(_val_shape(n)) >= 4), None)
    return _Core(softmax, "matmul-softmax", q, k, _gemm_operands(pv)[1], ops, pv, masks, False, scale or 1.0,
                 dropout_p, softcap or 0.0, heads, factors)


def _val_shape(node: Node) -> tuple[int, ...]:
    value = node.meta.get("val")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _gemm_operands(node: Node) -> tuple[Node, Node]:
    """The two multiplied operands of a matmul/bmm/baddbmm/einsum node (as multiplied: K^T for QK^T)."""
    name = op_name(node)
    if name == "einsum":
        return tuple(node.args[1])
    return tuple(node.args[1:3]) if name == "baddbmm" else tuple(node.args[:2])


def _is_batched_matmul(node: Node) -> bool:
    """A two-operand GEMM in attention's layout: matmul/bmm/baddbmm, or an einsum ``b..rk,b..kc->b..rc``
    (or ``b..rk,b..ck``) whose batch letters lead every term, so the last two dims are (rows, cols)."""
    name = op_name(node)
    if name != "einsum":
        return name in _GEMM_2D
    equation, operands = node.args[0], node.args[1]
    if not isinstance(equation, str) or equation.count("->") != 1 or "." in equation or len(operands) != 2:
        return False
    inputs, output = equation.replace(" ", "").split("->")
    left, _, right = inputs.partition(",")
    if min(len(left), len(right), len(output)) < 2:
        return False
    batch, rows, cols, inner = output[:-2], output[-2], output[-1], left[-1]
    return (left[:-2] == right[:-2] == batch and left[-2] == rows and inner not in output
            and right[-2:] in (inner + cols, cols + inner))


def _pv_path(probabilities: Node) -> list[Node] | None:
    """Nodes from the probabilities (dropout, casts) to the matmul that multiplies them by V, or None."""
    for user in probabilities.users:
        if op_name(user) in ("matmul", "bmm", "einsum") and _is_batched_matmul(user) and _gemm_operands(user)[0] is probabilities:
            return [user]
        if op_name(user) in _PROBABILITY_PASS and (rest := _pv_path(user)) is not None:
            return [user, *rest]
    return None


_SCORE_PASS = {"to", "_to_copy", "type_as", "clone", "contiguous"}
_SCALE = {"mul", "div", "mul_", "div_"}  # by a number; in place in Falcon's eager ``scores /= sqrt(d)``


def _trace_scores(node: Node, ops: list[Node]):
    """Walk back from the softmax input to the QK^T GEMM: returns (qk, masks, scale, softcap, factors) or None.

    ``scale`` multiplies the scores before a soft-capping ``tanh`` (if any); ``softcap`` is the factor
    after it (None without a tanh); ``factors`` are learned tensors the scores are multiplied or divided
    by. ``ops`` receives the scale/cap/mask/cast/view nodes passed on the way (only when the walk succeeds).
    """
    name = op_name(node)
    if name in _GEMM_2D:
        return (node, [], None, None, []) if _is_batched_matmul(node) else None
    args, learned = node.args, None
    if (name in _SCORE_PASS or name in _HEAD_VIEWS or name == "tanh"
            or (name in _SCALE and isinstance(args[1], (int, float)))):
        step, mask = args[0], None
    elif name in ("add", "add_") and all(isinstance(arg, Node) for arg in args[:2]):  # add_: SpeechT5's ``scores += rel_pos_bias``
        step = next((arg for arg in args[:2] if _trace_scores(arg, []) is not None), None)
        mask = (args[1] if step is args[0] else args[0], "add")
    elif name == "where" and isinstance(args[0], Node):
        step = next((arg for arg in args[1:3] if isinstance(arg, Node) and _trace_scores(arg, []) is not None), None)
        mask = (args[0], "keep" if step is args[1] else "drop")
    elif name == "masked_fill":
        step, mask = args[0], (args[1], "drop")
    elif name in ("mul", "div") and (learned := _learned_factor(args, commutes=name == "mul")) is not None:
        step, mask = args[0] if learned is args[1] else args[1], None
    else:
        return None
    found = None if step is None else _trace_scores(step, ops)
    if found is None:
        return None
    qk, masks, scale, softcap, factors = found
    if learned is not None:
        factors.append(learned)
    if name == "tanh":
        softcap = 1.0
    elif name in _SCALE and isinstance(args[1], (int, float)):
        factor = args[1] if name.startswith("mul") else 1.0 / args[1]
        if softcap is None:
            scale = (scale or 1.0) * factor
        else:
            softcap *= factor
    if mask is not None:
        masks.append(mask)
    ops.append(node)
    return qk, masks, scale, softcap, factors


def _learned_factor(args: tuple, *, commutes: bool) -> Node | None:
    """The operand of ``scores * f`` (``f * scores`` too) or ``scores / f`` that is a learned factor: a tensor
    with one value per batch or head, broadcast over the score matrix (Swin v2's ``exp(logit_scale)``), and
    computed without the scores."""
    candidates = (args[1], args[0]) if commutes else (args[1],)
    for factor in candidates:
        other = args[0] if factor is args[1] else args[1]
        value = factor.meta.get("val") if isinstance(factor, Node) else None
        scores = other.meta.get("val") if isinstance(other, Node) else None
        if (isinstance(value, torch.Tensor) and isinstance(scores, torch.Tensor) and value.dim() <= scores.dim()
                and tuple(value.shape[-2:]) in ((), (1,), (1, 1)) and _trace_scores(factor, []) is None):  # fmt: skip
            return factor
    return None


def _site(core: _Core, parameters: set[str], fact: tuple[bool, MaskKind, MaskEvidence]) -> AttentionSite:
    q_shape, k_shape, v_shape = (tuple(node.meta["val"].shape) for node in (core.q, core.k, core.v))
    seq_q, head_dim_qk = q_shape[-2:]
    seq_kv, head_dim_v = v_shape[-2:]
    (q_path, q_stop), (k_path, k_stop), (v_path, v_stop) = (_layout_path(node) for node in (core.q, core.k, core.v))
    if len(q_shape) >= 4:
        batch, num_heads = math.prod(q_shape[:-3]), q_shape[-3]
        kv_heads = k_shape[-3] if len(k_shape) >= 4 else num_heads
    else:  # (B*H, S, D): heads from a (B, H, Sq, Skv) view of the scores, or from the (B, H, S, D) Q was
        # merged from, else the projection width (MHA's (S, B*H, D) view of its in-projection)
        split = next((shape for shape in map(_val_shape, q_path) if len(shape) >= 4 and shape[-2:] == (seq_q, head_dim_qk)
                      and math.prod(shape[:-2]) == math.prod(q_shape[:-2])), None)  # fmt: skip
        num_heads = core.heads or (split[-3] if split else _width([*q_path, q_stop], head_dim_qk) // head_dim_qk)
        batch, kv_heads = math.prod(q_shape[:-2]) // num_heads, num_heads
    projections = {name: _projection(stop, parameters) for name, stop in (("q", q_stop), ("k", k_stop), ("v", v_stop))}
    out_projection, out_path = _out_projection(core.out, parameters)
    projections["out"] = out_projection
    kind = _kind(projections, parameters, q_stop, k_stop)
    causal, mask, evidence = fact
    name, module_type = _module(core.anchor)
    core_nodes = {*q_path, *k_path, *v_path, *core.ops, *out_path}
    order = {node: index for index, node in enumerate(core.anchor.graph.nodes)}
    return AttentionSite(
        name=name,
        module_type=module_type,
        form=core.form,
        kind=kind,
        causal=causal,
        num_heads=num_heads,
        num_kv_heads=kv_heads // _expansion(_between(projections["k"], core.k) if projections["k"] else k_path),
        head_dim_qk=head_dim_qk,
        head_dim_v=head_dim_v,
        batch=batch,
        seq_q=seq_q,
        seq_kv=seq_kv,
        mask=mask,
        dropout_p=core.dropout_p,
        scale=float(core.scale if core.scale is not None else 1.0 / math.sqrt(head_dim_qk)),
        core=tuple(node.name for node in sorted(core_nodes, key=order.__getitem__)),
        mask_nodes=tuple(node.name for node, _ in core.masks),
        projections={key: None if node is None else node.name for key, node in projections.items()},
        qkv_layout=_qkv_layout(projections, kind),
        softcap=float(core.softcap),
        scale_nodes=tuple(node.name for node in core.factors),
        mask_evidence=evidence,
    )


def _layout_path(node: Node) -> tuple[list[Node], Node]:
    """Layout-only nodes walked back from ``node`` (head reshapes, splits), and the node where the walk stopped."""
    path = []
    while op_name(node) in _LAYOUT and isinstance(node.args[0], Node):
        path.append(node)
        node = node.args[0]
    return path, node


def _width(nodes: list[Node], head_dim: int) -> int:
    """Last dim of the first tensor on ``nodes`` that is not ``head_dim`` wide (heads * head_dim)."""
    for node in nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.shape[-1] != head_dim:
            return int(value.shape[-1])
    return head_dim


def _between(source: Node, target: Node) -> set[Node]:
    """Nodes on any path from ``source`` to ``target`` (``target`` included), e.g. K's from its projection
    through head splits, RoPE and GQA expansion. ``source`` must be an ancestor of ``target``."""
    below, node = {source}, source
    while node is not target:  # graph order is topological: descendants of source up to target
        node = node.next
        if any(arg in below for arg in node.all_input_nodes):
            below.add(node)
    path, stack = {target}, [target]
    while stack:  # ... that are also ancestors of target
        for arg in stack.pop().all_input_nodes:
            if arg in below and arg is not source and arg not in path:
                path.add(arg)
                stack.append(arg)
    return path


def _expansion(path: Iterable[Node]) -> int:
    """How many times K heads are repeated on ``path`` (GQA ``repeat_kv``, Falcon's ``broadcast_to`` of the
    K group to the query heads, repeat_interleave)."""
    factor = 1
    for node in path:
        if op_name(node) in ("expand", "broadcast_to"):
            before, after = node.args[0].meta["val"].shape, node.meta["val"].shape
            factor *= math.prod(a for b, a in zip(reversed(before), reversed(after)) if b == 1 and a > 1)
        elif op_name(node) == "repeat_interleave" and isinstance(node.args[1], int):
            factor *= node.args[1]
    return factor


def _weight_index(node: Node, parameters: set[str]) -> int | None:
    """Index of the argument of a GEMM that is a parameter (seen through layout ops), else None."""
    if op_name(node) not in ("linear", "addmm", "mm", "matmul"):
        return None
    candidates = (1, 2) if op_name(node) == "addmm" else (1, 0)
    for index in candidates:
        if index < len(node.args) and isinstance(node.args[index], Node):
            _, root = _layout_path(node.args[index])
            if root.op == "get_attr" and root.target in parameters:
                return index
    return None


def _activation(gemm: Node, parameters: set[str]) -> Node:
    weight = _weight_index(gemm, parameters)
    index = {"addmm": 3 - weight}.get(op_name(gemm), 1 - weight)
    return _layout_path(gemm.args[index])[1]


def _projection(start: Node, parameters: set[str]) -> Node | None:
    """Nearest GEMM with a weight parameter above ``start`` (breadth-first, through RoPE and casts)."""
    queue, seen = [start], {start}
    while queue and len(seen) < _SEARCH_LIMIT:
        node = queue.pop(0)
        if _weight_index(node, parameters) is not None:
            return node
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                queue.append(arg)
    return None


def _out_projection(out: Node, parameters: set[str]) -> tuple[Node | None, list[Node]]:
    """The GEMM that consumes the attention output after head merges, and the layout nodes between."""
    path, frontier = [], [out]
    while frontier:
        node = frontier.pop(0)
        for user in node.users:
            if _weight_index(user, parameters) is not None and _activation(user, parameters) in (out, *path):
                return user, path
            if op_name(user) in _LAYOUT:
                path.append(user)
                frontier.append(user)
    return None, path


def _kind(projections: dict[str, Node | None], parameters: set[str], q_stop: Node, k_stop: Node) -> str:
    q, k = projections["q"], projections["k"]
    if q is not None and k is not None:
        same = q is k or _activation(q, parameters) is _activation(k, parameters)
    else:
        same = q_stop is k_stop
    return "self" if same else "cross"


def _qkv_layout(projections: dict[str, Node | None], kind: str) -> str:
    q, k, v = projections["q"], projections["k"], projections["v"]
    if q is None or k is None or v is None:
        return "unknown"
    if q is k is v:
        return "packed"
    if k is v:
        return "kv-packed"
    return "separate" if kind == "self" else "separate-kv"


def _module(node: Node) -> tuple[str, str]:
    """Path and class name of the innermost module that ran ``node``."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack:
        return "", "root"
    path, module_type = stack[-1]
    return path, (module_type if isinstance(module_type, str) else module_type.__name__).rsplit(".", 1)[-1]


def _mask_facts(
    captured: CapturedGraph, cores: list[_Core], probe: CapturedGraph | Callable[[], CapturedGraph] | None
) -> list[tuple[bool, MaskKind, MaskEvidence]]:
    """``(causal, mask kind, evidence)`` per core, from the example's mask values, else the probe's, else the graph."""
    masks = [mask for core in cores for mask, _ in core.masks]
    if not masks:
        return [_mask_kind(core, {}, "flag") for core in cores]
    if evaluable(captured, masks):
        values = evaluate(captured, masks)
        return [_mask_kind(core, values, "values") for core in cores]
    probe = probe() if callable(probe) else probe
    if probe is not None:
        probe_cores = _cores(probe.graph_module.graph)
        probe_masks = [mask for core in probe_cores for mask, _ in core.masks]
        if _aligned(cores, probe_cores) and evaluable(probe, probe_masks):
            values = evaluate(probe, probe_masks)
            return [_mask_kind(core, values, "probe") for core in probe_cores]
    return [_mask_kind(core, {}, "graph") for core in cores]


def _aligned(cores: list[_Core], probe_cores: list[_Core]) -> bool:
    """Whether the probe's attention matches site by site: module, form, flag and how each mask applies."""
    def signature(core: _Core):
        return _module(core.anchor), core.form, core.causal, [how for _, how in core.masks]

    return len(cores) == len(probe_cores) and all(signature(a) == signature(b) for a, b in zip(cores, probe_cores))


def _mask_kind(core: _Core, values: dict[Node, torch.Tensor], evidence: MaskEvidence) -> tuple[bool, MaskKind, MaskEvidence]:
    """(causal, mask kind, evidence) from the flag and the masks' values (CPU tensors) at the core's shapes.

    Without values (``evidence="graph"``) the kind comes from the graph alone: ``padding`` if a mask is
    computed from a model input, else ``bool``/``additive``; causality from the flag.
    """
    if not core.masks:
        return core.causal, "causal" if core.causal else "none", "flag"
    if evidence == "graph":
        if any(_from_input(node) for node, _ in core.masks):
            return core.causal, "padding", evidence
        return core.causal, "bool" if all(how != "add" for _, how in core.masks) else "additive", evidence
    seq_q, seq_kv = _val_shape(core.q)[-2], _val_shape(core.v)[-2]
    allowed, only_masking = None, True
    for node, how in core.masks:
        value = values[node]
        if how == "add":
            keep = value > torch.finfo(value.dtype).min / 2
            only_masking &= bool((value[keep] == 0).all())
        else:
            keep = value.bool() if how == "keep" else ~value.bool()
        allowed = keep if allowed is None else allowed & keep
    future = torch.ones(seq_q, seq_kv, dtype=torch.bool, device=allowed.device).triu(seq_kv - seq_q + 1)
    allowed = torch.broadcast_to(allowed, (*allowed.shape[:-2], seq_q, seq_kv))
    causal = core.causal or (bool(future.any()) and not bool((allowed & future).any()))
    if causal and only_masking and bool((allowed == ~future).all()):
        return causal, "causal", evidence
    if only_masking and _masks_whole_keys(allowed, ~future if causal else None) and any(_from_input(node) for node, _ in core.masks):
        return causal, "padding", evidence
    if only_masking and bool(allowed.all()):  # e.g. an all-True mask built from constants
        return causal, "none", evidence
    return causal, "bool" if all(how != "add" for _, how in core.masks) else "additive", evidence


def _masks_whole_keys(allowed: torch.Tensor, base: torch.Tensor | None) -> bool:
    """Whether ``allowed`` (..., Sq, Skv) hides whole keys inside ``base`` (the causal pattern, or every
    pair when None), as padding does: each key is seen by every query ``base`` lets see it, or by none.
    Queries that see every key or none are left out (transformers opens the rows of padded queries).
    A sliding window hides keys from some queries only."""
    inside = allowed if base is None else allowed | ~base
    partial = ~inside.all(dim=-1, keepdim=True) & (allowed if base is None else allowed & base).any(dim=-1, keepdim=True)
    seen_by_all, hidden_from_all = (inside | ~partial).all(dim=-2), (~inside | ~partial).all(dim=-2)
    return bool((seen_by_all | hidden_from_all).all())


def _from_input(node: Node) -> bool:
    """Whether ``node`` is computed from a model input (not only from constants and weights)."""
    stack, seen = [node], set()
    while stack:
        node = stack.pop()
        if node.op == "placeholder":
            return True
        seen.add(node)
        stack.extend(arg for arg in node.all_input_nodes if arg not in seen)
    return False
