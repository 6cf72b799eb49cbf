"""Structural projection fusion: sibling ``nn.Linear`` layers that read the same tensor become one GEMM.

Found from the model, not from names: one traced forward records, for every module with two or
more ``nn.Linear`` children, which child was called with which tensor *object*. Children whose
calls received exactly the same tensors (Q/K/V of self attention; K/V of cross attention, where Q
reads the decoder states) form a group, unless the trace saw their outputs feed only elementwise
ops (a gated MLP's gate/up: eager kernels read a fused GEMM's strided slices slower, so that costs
more than the GEMM saves). Each group becomes one
:class:`FusedLinear` holding the concatenated weight, and every member is replaced, under its own
attribute name, by a :class:`FusedProjection` that returns exactly what the ``nn.Linear`` did, so
the model's own ``forward`` (and transformers' attention-interface path) runs unchanged.

One GEMM per group: in eager mode the first member called with ``x`` computes ``x @ W_all^T`` and
keeps the other members' column slices; a sibling called with the *same* tensor (same object, same
version, same weights, grad and autocast state) receives its slice, anything else computes afresh.
Each slice is handed out once and the last hand-out drops the group's reference; slices a forward
never asked for are dropped when the fused model's ``forward`` returns (one forward hook on the model,
not one per parent: a hook puts every call of its module on ``nn.Module``'s slow path, which cost a
host-bound BERT-128 forward 0.23 ms of 5.2 on an H200, ``optimize-host-time-...-run4-final.json``),
or at the group's next call. So nothing is reused across calls or kept alive after a forward. While
``torch.compile`` traces, the same hand-over is graph dataflow (the first member's GEMM node, keyed
by the traced input, dropped by the last member), so the graph holds one GEMM per group and no graph
break, and a graph that ends inside the model's forward (a block compiled alone) keeps nothing alive.
Nothing here draws random numbers.

State dicts keep the original keys (``q_proj.weight`` ... split from the fused weight on save,
concatenated on load), so checkpoints of the original model load, and saved ones load into it.

Example::

    plan = plan_fusion(model, (ids,))     # trace once: which siblings read the same input
    apply_fusion(model, plan)             # in place
    print(plan.describe())
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from attnkit.errors import check_arg, check_type

__all__ = ["FusionGroup", "FusionRefusal", "FusionPlan", "FusedLinear", "FusedProjection", "plan_fusion", "apply_fusion", "fused_groups"]

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
_is_grad_enabled, _is_inference_mode_enabled = torch.is_grad_enabled, torch.is_inference_mode_enabled
_is_autocast_enabled, _autocast_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype
_is_compiling = torch.compiler.is_compiling


@dataclass(frozen=True)
class FusionGroup:
    """Sibling projections that become one GEMM."""

    parent: str
    """Dotted path of the module holding them ("" for the root)."""
    members: tuple[str, ...]
    """Their attribute names, in the parent's registration order."""
    widths: tuple[int, ...] = ()
    """Output features of each member (informational)."""


@dataclass(frozen=True)
class FusionRefusal:
    """Siblings that read the same input but were left separate, and why."""

    parent: str
    members: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class FusionPlan:
    """What :func:`apply_fusion` fuses (from :func:`plan_fusion`, or read back with :meth:`from_json`)."""

    groups: tuple[FusionGroup, ...] = ()
    refused: tuple[FusionRefusal, ...] = ()

    def to_json(self) -> dict:
        return {
            "groups": [{"parent": g.parent, "members": list(g.members), "widths": list(g.widths)} for g in self.groups],
            "refused": [{"parent": r.parent, "members": list(r.members), "reason": r.reason} for r in self.refused],
        }

    @classmethod
    def from_json(cls, record: dict) -> "FusionPlan":
        groups = tuple(FusionGroup(g["parent"], tuple(g["members"]), tuple(g.get("widths", ()))) for g in record.get("groups", ()))
        refused = tuple(FusionRefusal(r["parent"], tuple(r["members"]), r["reason"]) for r in record.get("refused", ()))
        return cls(groups, refused)

    def describe(self) -> list[str]:
        """One line per group and refusal."""
        lines = [f"{g.parent or '<root>'}: {' + '.join(g.members)} -> one GEMM" for g in self.groups]
        return lines + [f"{r.parent or '<root>'}: {', '.join(r.members)} left separate: {r.reason}" for r in self.refused]


# -- the fused modules -------------------------------------------------------------------------


class _Pending:
    """Column slices of one fused GEMM not yet handed to their members (a plain class with slots: it is
    built at every fused GEMM of a forward, and a dataclass's ``__init__`` costs more host time)."""

    __slots__ = ("source", "key", "slices", "left")

    def __init__(self, source: weakref.ref, key: tuple, slices: list, left: int):
        self.source, self.key = source, key
        self.slices = slices
        """Per member index: its slice, or None once handed out (or for the member that computed it)."""
        self.left = left
        """Slices not yet handed out."""


class FusedLinear(nn.Module):
    """Several ``nn.Linear`` of the same input as one: ``weight (sum(out_i), in)``, ``bias`` or None.

    Members with a bias come first in the fused layout, so a group where only some members have a
    bias (Whisper's K projection has none) stores one ``bias`` over those and pads zeros at call time.
    Build with :meth:`from_linears`; the members are :class:`FusedProjection` modules in the parent.
    """

    def __init__(self, names: tuple[str, ...], widths: tuple[int, ...], has_bias: tuple[bool, ...], in_features: int, *, attr_name: str, device=None, dtype=None):
        super().__init__()
        self.names, self.widths, self.has_bias, self.in_features = names, widths, has_bias, in_features
        self.attr_name = attr_name
        """This module's attribute name in the parent (state-dict keys are rewritten around it)."""
        order = sorted(range(len(names)), key=lambda i: not has_bias[i])  # biased members first
        starts, offset = [0] * len(names), 0
        for i in order:
            starts[i], offset = offset, offset + widths[i]
        self.starts = tuple(starts)
        self.layout = tuple(order)
        """Member indices in the order of their columns in the fused output."""
        self.positions = tuple(order.index(i) for i in range(len(names)))
        """Per member index: its position in ``layout``."""
        self.split_widths = tuple(widths[i] for i in order)
        self.out_features = offset
        self.bias_width = sum(w for w, b in zip(widths, has_bias) if b)
        self.weight = nn.Parameter(torch.empty(offset, in_features, device=device, dtype=dtype))
        self.register_parameter("bias", nn.Parameter(torch.empty(self.bias_width, device=device, dtype=dtype)) if self.bias_width else None)
        self.register_buffer("_zero_bias", torch.zeros(offset - self.bias_width, device=device, dtype=dtype), persistent=False)
        self._pending: _Pending | None = None
        self._traced: tuple | None = None
        self._absent: dict[str, list[str]] = {}  # during a load: fused key -> the original keys that were missing

    @classmethod
    def from_linears(cls, linears: dict[str, nn.Linear], attr_name: str) -> "FusedLinear":
        """The fused module of ``{name: linear}`` (weights copied, ``requires_grad`` kept)."""
        names = tuple(linears)
        first = next(iter(linears.values()))
        fused = cls(
            names, tuple(l.out_features for l in linears.values()), tuple(l.bias is not None for l in linears.values()),
            first.in_features, attr_name=attr_name, device=first.weight.device, dtype=first.weight.dtype,
        )  # fmt: skip
        with torch.no_grad():
            for i, linear in enumerate(linears.values()):
                fused.weight[fused.starts[i] : fused.starts[i] + fused.widths[i]].copy_(linear.weight)
                if linear.bias is not None:
                    fused.bias[fused.starts[i] : fused.starts[i] + fused.widths[i]].copy_(linear.bias)
        fused.weight.requires_grad_(first.weight.requires_grad)
        if fused.bias is not None:
            fused.bias.requires_grad_(next(l.bias for l in linears.values() if l.bias is not None).requires_grad)
        fused.train(first.training)
        return fused

    def extra_repr(self) -> str:
        parts = " | ".join(f"{n} {w}" for n, w in zip(self.names, self.widths))
        return f"in_features={self.in_features}, out_features={self.out_features} ({parts}), bias={self.bias is not None}"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_pending"] = state["_traced"] = None  # autograd-carrying slices are never copied or pickled
        return state

    def full_bias(self) -> torch.Tensor | None:
        """The bias over the whole fused output (zeros for members without one)."""
        bias = self.__dict__["_parameters"]["bias"]  # not nn.Module.__getattr__'s lookup chain: a host-bound forward calls this per group
        if bias is None or self.bias_width == self.out_features:
            return bias
        return torch.cat([bias, self._zero_bias])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in) -> (..., sum(out_i))`` in the fused layout."""
        return F.linear(x, self.__dict__["_parameters"]["weight"], self.full_bias())

    def member_weight(self, index: int) -> torch.Tensor:
        return self.weight.narrow(0, self.starts[index], self.widths[index])

    def member_bias(self, index: int) -> torch.Tensor | None:
        return self.bias.narrow(0, self.starts[index], self.widths[index]) if self.has_bias[index] else None

    def member_output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """What member ``index``'s ``nn.Linear`` returns for ``x``, from one GEMM shared with its siblings."""
        start, width = self.starts[index], self.widths[index]
        if _is_compiling():
            # Traced dataflow: the siblings' narrows read one GEMM node of the graph. The last sibling drops the
            # reference, so a graph that ends inside the model's forward (a compiled block) keeps nothing alive.
            mode = (torch.is_grad_enabled(), torch.is_autocast_enabled(x.device.type))
            traced = self._traced
            if traced is not None and traced[0] is x and traced[2] == mode:
                left = traced[3] - 1
                self._traced = (x, traced[1], mode, left) if left else None
                return traced[1].narrow(-1, start, width)
            full = self.forward(x)
            # nn.Module.__setattr__: the write dynamo traces (see reset())
            self._traced = (x, full, mode, len(self.names) - 1) if len(self.names) > 1 else None
            return full.narrow(-1, start, width)
        key = self._key(x)
        pending = self.__dict__["_pending"]
        if pending is not None and pending.key == key and pending.source() is x:
            out = pending.slices[index]
            if out is not None:
                pending.slices[index] = None
                pending.left -= 1
                if not pending.left:
                    self.__dict__["_pending"] = None
                return out
            # Called twice with the same input: compute this member alone, keep the siblings' slices.
            return F.linear(x, self.member_weight(index), self.member_bias(index))
        # One split, not a narrow per member: its backward is one cat of the members' gradients, where
        # narrows would each zero-fill a gradient of the whole fused output and add them up.
        # (Tensor.split_with_sizes: the C method, without torch.split's two Python layers.)
        parts = self.forward(x).split_with_sizes(self.split_widths, -1)
        slices = [parts[position] for position in self.positions]  # member order
        out = slices[index]
        if len(slices) > 1:
            slices[index] = None
            self.__dict__["_pending"] = _Pending(weakref.ref(x), key, slices, len(slices) - 1)
        else:
            self.__dict__["_pending"] = None
        return out

    def _key(self, x: torch.Tensor) -> tuple:
        """Everything besides the input's identity that a reused slice must agree on: the input's and the
        weights' in-place versions and storage, x's dtype and whether it needs a gradient, and the grad, inference and
        autocast modes. Each member's call computes it, so it is kept to a few attribute reads (a host-bound
        BERT runs it 36 times per forward)."""
        params = self.__dict__["_parameters"]  # nn.Module.__getattr__ costs a lookup chain per read
        weight, bias = params["weight"], params["bias"]
        device = "cuda" if x.is_cuda else x.device.type
        return (
            # inference-mode tensors (inputs, or weights cast inside inference mode) have no version counter
            None if x.is_inference() else x._version, x.data_ptr(), x.dtype, x.requires_grad,
            None if weight.is_inference() else weight._version, weight.data_ptr(),
            None if bias is None else (None if bias.is_inference() else bias._version, bias.data_ptr()),
            _is_grad_enabled(), _is_inference_mode_enabled(),
            _autocast_dtype(device) if _is_autocast_enabled(device) else None,
        )  # fmt: skip

    def reset(self) -> None:
        """Drop any slices not yet handed out (called when the fused model's forward ends)."""
        if _is_compiling():
            # nn.Module.__setattr__, which dynamo traces; torch 2.11's dynamo breaks the graph on a write
            # through __dict__ (one break per fused parent: BERT-128 compiled 2x slower, seen on an H200)
            self._pending = self._traced = None
            return
        # Eager: straight into __dict__, as nn.Module.__setattr__ (parameter, buffer and submodule checks)
        # costs microseconds, paid for every group at every forward.
        self.__dict__.update(_pending=None, _traced=None)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """Emit the members' original ``<parent>.<name>.weight`` / ``.bias`` entries, in registration order."""
        parent = prefix[: -len(self.attr_name) - 1]
        for i, name in enumerate(self.names):
            weight, bias = self.member_weight(i), self.member_bias(i)
            destination[f"{parent}{name}.weight"] = weight if keep_vars else weight.detach()
            if bias is not None:
                destination[f"{parent}{name}.bias"] = bias if keep_vars else bias.detach()


class FusedProjection(nn.Module):
    """One member of a :class:`FusedLinear`, in place of its ``nn.Linear``: same call, same result.

    Has no parameters of its own; ``weight``/``bias`` are row views of the fused ones.
    """

    def __init__(self, group: FusedLinear, index: int):
        super().__init__()
        object.__setattr__(self, "_group", group)  # not a child: the parameters belong to the parent's group
        self.index = index
        self.in_features, self.out_features = group.in_features, group.widths[index]

    @property
    def weight(self) -> torch.Tensor:
        return self._group.member_weight(self.index)

    @property
    def bias(self) -> torch.Tensor | None:
        return self._group.member_bias(self.index)

    def extra_repr(self) -> str:
        g = self._group
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={g.has_bias[self.index]}, fused in {g.attr_name}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's argument name
        return self._group.member_output(self.index, input)

    def _load_from_state_dict(self, *args) -> None:
        """Nothing to load: the parent's pre-hook hands this member's keys to the group."""


def _reset_groups(groups: tuple[FusedLinear, ...], *_) -> None:
    """Forward hook of the fused model (bound with ``functools.partial``, so copies and pickles follow the
    model): slices never outlive one forward of it (traced too)."""
    for group in groups:
        group.reset()


def _load_into_groups(parent: nn.Module, state_dict: dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """Load pre-hook of a parent: the members' original keys, concatenated, become the group's.

    When only some are present (``strict=False``), those are copied into their rows directly and
    the absent ones are reported under their own names.
    """
    for group in parent._modules.values():
        if not isinstance(group, FusedLinear):
            continue
        order = sorted(range(len(group.names)), key=lambda i: group.starts[i])
        for kind, members in (("weight", order), ("bias", [i for i in order if group.has_bias[i]])):
            keys = [f"{prefix}{group.names[i]}.{kind}" for i in members]
            if not members or all(k in state_dict for k in keys):
                if members:
                    state_dict[f"{prefix}{group.attr_name}.{kind}"] = torch.cat([state_dict.pop(k) for k in keys])
                continue
            group._absent[f"{prefix}{group.attr_name}.{kind}"] = [k for k in keys if k not in state_dict]
            for i, key in zip(members, keys):
                if key in state_dict:
                    rows = (group.member_weight if kind == "weight" else group.member_bias)(i)
                    value = state_dict.pop(key)
                    if value.shape != rows.shape:
                        error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, the current shape is {tuple(rows.shape)}.")
                        continue
                    with torch.no_grad():
                        rows.copy_(value)


def _missing_as_original(group: FusedLinear, incompatible) -> None:
    """Load post-hook: a missing fused entry is reported as the members' original keys that were absent."""
    for fused_key, absent in group._absent.items():
        if fused_key in incompatible.missing_keys:
            incompatible.missing_keys.remove(fused_key)
            incompatible.missing_keys.extend(absent)
    group._absent.clear()


# -- planning ----------------------------------------------------------------------------------


def _plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _has_hooks(module: nn.Module) -> bool:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")
    return any(getattr(module, name, None) for name in names)


@dataclass
class _Calls:
    """One traced Linear: the tensors it was called with (kept alive so identities stay unique)."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    consumers: set[str] = field(default_factory=set)
    """Names of the torch functions and tensor methods that read an output directly."""
    layout_refusal: str | None = None
    """Why a column slice of a fused output could not stand in for this output (a view it cannot give)."""

    def signature(self) -> tuple:
        return tuple((id(x), v) for x, v in zip(self.inputs, self.versions))


def _candidates(model: nn.Module, module_filter_fn) -> dict[str, tuple[nn.Module, dict[str, nn.Linear]]]:
    """``{parent fqn: (parent, {name: linear})}`` for parents with two or more plain Linear children."""
    found = {}
    for fqn, parent in model.named_modules():
        linears = {name: child for name, child in parent.named_children() if _plain_linear(child)}
        if len(linears) < 2 or isinstance(parent, FusedLinear):
            continue
        if module_filter_fn is not None and not module_filter_fn(parent, fqn):
            continue
        found[fqn] = (parent, linears)
    return found


# Ops that split a projection's output into heads: views of it (or, for reshape, maybe a copy).
_HEAD_SPLITS = frozenset({
    "view", "reshape", "transpose", "permute", "unflatten", "flatten", "view_as", "reshape_as", "split",
    "split_with_sizes", "chunk", "unbind", "narrow", "unsqueeze", "squeeze", "movedim", "swapaxes", "swapdims",
    "t", "__getitem__",
})  # fmt: skip
# What may read a projection's output directly for its group to be fused: splitting it into heads
# or multiplying it (matmul, attention); and reads of its metadata.
_HEAD_READERS = _HEAD_SPLITS | {"matmul", "__matmul__", "bmm", "baddbmm", "einsum", "scaled_dot_product_attention"}
_METADATA = frozenset({"__get__", "size", "dim", "stride", "numel", "is_contiguous", "data_ptr", "element_size", "__len__"})
_IN_PLACE_OPERATORS = frozenset({
    "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__", "__imatmul__",
    "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__setitem__",
})  # fmt: skip


def _writes_in_place(name: str) -> bool:
    """Whether the torch function ``name`` modifies its tensor argument (``x /= c``, ``x.mul_(c)``, ``x[i] = c``...)."""
    return name in _IN_PLACE_OPERATORS or (name.endswith("_") and not name.startswith("_") and name != "requires_grad_")


# Ops whose result may share the watched tensor's memory: what reads (or writes into) such a view reads
# (or writes into) the projection's output, so the view is watched too (``__get__``: ``.T``, ``.data``).
_VIEWS = _HEAD_SPLITS | {"expand", "expand_as", "as_strided", "__get__"}


class _Readers(TorchFunctionMode):
    """Records, for each watched projection output and the views taken of it, the names of the functions the
    traced model calls on it; and replays every view on a stand-in with a fused slice's layout.

    A fused member's output is a column slice of a wider GEMM output (its rows ``sum(out_i)`` apart, not
    ``out_i``), so a view that merges the feature dimension with the rows (SpeechT5's postnet:
    ``feat_out(h).view(B, -1, mel_bins)``) works on the original and raises on the slice. The stand-in is a
    meta tensor (no memory) sliced from one column wider; the same view on it raises exactly where the fused
    model's would. ``as_strided`` on a tensor whose stand-in has other strides reads other memory without raising,
    so it refuses too (Longformer's, on a reshaped copy, does not).
    """

    def __init__(self):
        super().__init__()
        self.watched: dict[int, tuple[_Calls, torch.Tensor | None]] = {}  # id -> (the projection's record, its fused-layout stand-in or None)
        self._views: list = []  # keeps watched views alive, so their ids stay unique while the trace runs

    def watch(self, output: torch.Tensor, entry: _Calls) -> None:
        """Watch one projection output (``(..., out)``: a Linear's output has at least one dim)."""
        width = output.shape[-1]
        wide = torch.empty(*output.shape[:-1], width + 1, dtype=output.dtype, device="meta")
        self.watched[id(output)] = (entry, wide[..., :width])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        found = None
        if self.watched:
            for arg in (*args, *kwargs.values()):
                watched = self.watched.get(id(arg)) if isinstance(arg, torch.Tensor) else None
                if watched is not None:
                    watched[0].consumers.add(name)
                    found = watched
        result = func(*args, **kwargs)
        if found is not None and name == "as_strided" and found[0].layout_refusal is None and self._moved(args[0]):
            found[0].layout_refusal = "its output is read with as_strided(), whose strides assume its own layout, not a slice of a fused output"
        if found is not None and name in _VIEWS:
            self._follow(func, name, args, kwargs, result, found[0])
        return result

    def _follow(self, func, name: str, args: tuple, kwargs: dict, result, entry: _Calls) -> None:
        """Watch the views ``func`` made of a watched tensor, each with its stand-in's view (None where the
        stand-in could not follow, e.g. a data-dependent index on meta: later views there go unchecked)."""
        try:
            shadow = func(*(self._stand_in(a) for a in args), **{k: self._stand_in(v) for k, v in kwargs.items()})
        except _NoStandIn:
            shadow = None
        except (RuntimeError, NotImplementedError) as error:
            if name in _LAYOUT_SENSITIVE and self._contiguous_gives(func, args, kwargs):  # only the strides differ
                if entry.layout_refusal is None:
                    entry.layout_refusal = f"{name}() of its output needs a layout a column slice of a fused output does not have ({str(error).splitlines()[0][:120]})"
                return
            shadow = None  # meta cannot replay this call (e.g. a size read with .item()): views of it go unchecked
        views = result if isinstance(result, (tuple, list)) else (result,)
        shadows = shadow if isinstance(shadow, (tuple, list)) else (shadow,) * len(views)
        for view, stand_in in zip(views, shadows):
            if isinstance(view, torch.Tensor) and id(view) not in self.watched:
                self.watched[id(view)] = (entry, stand_in if isinstance(stand_in, torch.Tensor) else None)
                self._views.append(view)

    def _moved(self, tensor) -> bool:
        """Whether a watched tensor would have other strides (or offset) in the fused model (unknown: no)."""
        stand_in = self.watched[id(tensor)][1] if isinstance(tensor, torch.Tensor) and id(tensor) in self.watched else None
        return stand_in is not None and (stand_in.stride(), stand_in.storage_offset()) != (tensor.stride(), tensor.storage_offset())

    def _contiguous_gives(self, func, args: tuple, kwargs: dict) -> bool:
        """Whether the call succeeds on meta with every watched tensor contiguous (so its failure on the
        stand-ins comes from their strides, not from meta)."""
        plain = lambda a: torch.empty(a.shape, dtype=a.dtype, device="meta") if isinstance(a, torch.Tensor) else a  # noqa: E731
        try:
            func(*(plain(a) for a in args), **{k: plain(v) for k, v in kwargs.items()})
        except (RuntimeError, NotImplementedError):
            return False
        return True

    def _stand_in(self, value):
        """A call argument for the replay: a watched tensor's stand-in, any other tensor on meta."""
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) in self.watched:
            stand_in = self.watched[id(value)][1]
            if stand_in is None:
                raise _NoStandIn
            return stand_in
        return value.to("meta")


class _NoStandIn(Exception):
    """A watched tensor whose fused-layout stand-in could not be followed."""


# The views whose success depends on the strides (a column slice has other strides, same shape): view and view_as.
_LAYOUT_SENSITIVE = frozenset({"view", "view_as"})


def _pointwise_only(members: list[_Calls]) -> str | None:
    """The ops a group's outputs feed when none of them is split into heads or multiplied (a gated MLP's
    gate/up feed an activation and a product), else None."""
    read = [c.consumers - _METADATA for c in members]
    if all(read) and not any(names & _HEAD_READERS for names in read):
        return ", ".join(sorted(set().union(*read)))
    return None


def _trace(model: nn.Module, candidates: dict, args: tuple, kwargs: dict) -> dict[int, _Calls]:
    """Run ``model`` once (eval, no grad) and record each candidate Linear's inputs and the ops that read its outputs."""
    calls: dict[int, _Calls] = {}
    handles = []
    readers = _Readers()

    def record(module, inputs):
        x = inputs[0] if inputs else None
        entry = calls.setdefault(id(module), _Calls())
        entry.inputs.append(x)
        entry.versions.append(x._version if isinstance(x, torch.Tensor) and not x.is_inference() else -1)

    def watch(module, inputs, output):
        entry = calls[id(module)]
        entry.outputs.append(output)  # kept alive: its id stays unique while the trace runs
        if isinstance(output, torch.Tensor):
            readers.watch(output, entry)

    for _, linears in candidates.values():
        for linear in linears.values():
            handles.append(linear.register_forward_pre_hook(record))
            handles.append(linear.register_forward_hook(watch))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), readers:
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return calls


def _member_refusal(linear: nn.Linear, calls: _Calls, shared: set[int]) -> str | None:
    """Why this projection cannot join a group, or None."""
    if id(linear) in shared:
        return "the projection (or its weight) is shared with another part of the model"
    if parametrize.is_parametrized(linear):
        return "the projection has a parametrization"
    if _has_hooks(linear):
        return "the projection has hooks, which a fused call would bypass"
    if any(not isinstance(x, torch.Tensor) for x in calls.inputs):
        return "called with something other than a tensor"
    if linear.weight.is_meta:
        return "weights on the meta device"
    if calls.layout_refusal is not None:
        return calls.layout_refusal
    if written := sorted(name for name in calls.consumers if _writes_in_place(name)):
        # A fused member's output is one of several views of the fused GEMM's output, which autograd
        # forbids modifying in place (Longformer's `query /= sqrt(d)`).
        return f"its output is modified in place ({', '.join(written)}), which a slice of a fused output does not allow under autograd"
    return None


def _group_refusal(members: list[nn.Linear]) -> str | None:
    """Why these projections (each fit, all reading the same tensors) cannot share one weight, or None."""
    first = members[0]
    if any((m.weight.dtype, m.weight.device, m.in_features) != (first.weight.dtype, first.weight.device, first.in_features) for m in members):
        return "weights differ in dtype, device or input width"
    if len({m.weight.requires_grad for m in members}) > 1 or len({m.bias.requires_grad for m in members if m.bias is not None}) > 1:
        return "some projections are frozen and others trainable"
    return None


def _shared_modules(model: nn.Module) -> set[int]:
    """ids of Linear modules reachable under several paths or holding a parameter used elsewhere too."""
    paths: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        paths[id(module)] = paths.get(id(module), 0) + 1
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(id(module))
    shared = {key for key, n in paths.items() if n > 1}
    for module in model.modules():
        if any(len(owners[id(p)]) > 1 for p in module.parameters(recurse=False)):
            shared.add(id(module))
    return shared


def plan_fusion(
    model: nn.Module, args: tuple, kwargs: dict | None = None, *, module_filter_fn: Callable[[nn.Module, str], bool] | None = None
) -> FusionPlan:
    """Which sibling ``nn.Linear`` layers of ``model`` read the same tensor, from one traced forward.

    Args:
        model: any module; run once in eval mode without gradients (modes are restored).
        args / kwargs: its example inputs (the trace sees only the paths they exercise).
        module_filter_fn: ``(parent, fqn) -> bool``; only parents it accepts are considered.

    Returns:
        A :class:`FusionPlan`: the groups to fuse, and siblings that read the same input but were
        refused (with the reason).
    """
    check_type(model, nn.Module, "model")
    check_type(args, tuple, "args")
    candidates = _candidates(model, module_filter_fn)
    if not candidates:
        return FusionPlan()
    calls = _trace(model, candidates, args, dict(kwargs or {}))
    shared = _shared_modules(model)
    groups, refused = [], []
    for fqn, (parent, linears) in candidates.items():
        if isinstance(parent, _CONTAINERS):
            called = tuple(n for n, m in linears.items() if id(m) in calls)
            if len(called) > 1 and len({calls[id(linears[n])].signature() for n in called}) < len(called):
                refused.append(FusionRefusal(fqn, called, f"siblings in a {type(parent).__name__}: a fused module added to it would change its length and iteration"))
            continue
        by_signature: dict[tuple, list[str]] = {}
        for name, linear in linears.items():
            if id(linear) in calls:
                by_signature.setdefault(calls[id(linear)].signature(), []).append(name)
        sources: dict[int, set[str]] = {}
        for names in by_signature.values():
            if len(names) > 1:
                fit = []
                for name in names:
                    reason = _member_refusal(linears[name], calls[id(linears[name])], shared)
                    if reason is None:
                        fit.append(name)
                    else:
                        refused.append(FusionRefusal(fqn, (name,), f"{reason} (reads the same input as {', '.join(n for n in names if n != name)})"))
                reason = _group_refusal([linears[n] for n in fit]) if len(fit) > 1 else None
                pointwise = _pointwise_only([calls[id(linears[n])] for n in fit]) if len(fit) > 1 else None
                if reason is None and pointwise is not None:
                    # Eager elementwise kernels read the fused GEMM's column slices (strided) slower than a
                    # Linear's own output: Llama-GQA at batch 64 on an H100, rewrite with gate/up fused 0.96x / 0.98x
                    # eager (inference / training), left separate 1.00-1.02x / 1.01x
                    # (optimize/rewrite-ratio-nvidia-h100-2026-11-27-session6-run1.json and -run3.json).
                    reason = f"their outputs feed only elementwise ops ({pointwise}), which run slower on a fused GEMM's strided column slices"
                if reason is not None:
                    refused.append(FusionRefusal(fqn, tuple(fit), reason))
                elif len(fit) > 1:
                    groups.append(FusionGroup(fqn, tuple(fit), tuple(linears[n].out_features for n in fit)))
            for name in names:
                for x_id, _ in calls[id(linears[name])].signature():
                    sources.setdefault(x_id, set()).add(name)
        overlapping = {frozenset(s) for s in sources.values() if len(s) > 1} - {frozenset(by) for by in by_signature.values()}
        for names in sorted(overlapping, key=sorted):
            refused.append(FusionRefusal(fqn, tuple(n for n in linears if n in names), "share an input on some calls only, or the input changed in place between them"))
    return FusionPlan(tuple(groups), tuple(refused))


# -- applying ----------------------------------------------------------------------------------


def apply_fusion(model: nn.Module, plan: FusionPlan) -> nn.Module:
    """Fuse ``plan``'s groups in ``model`` (in place); returns ``model``.

    Each group's parent gets a :class:`FusedLinear` child ``fused_<a>_<b>...`` at the position of
    its first member, the members become :class:`FusedProjection`, and the parent gets a load hook
    that accepts the original keys. ``model`` gets one forward hook that drops, when its forward
    returns, any slice not handed out (call the fused model itself, or the slices of a member called
    on its own wait for the group's next call).
    """
    check_type(plan, FusionPlan, "plan")
    for group in plan.groups:
        parent = model.get_submodule(group.parent)
        linears = {name: getattr(parent, name, None) for name in group.members}
        check_arg(
            all(_plain_linear(l) for l in linears.values()), "plan", f"nn.Linear children {group.members} of {group.parent or '<root>'}",
            {n: type(l).__name__ for n, l in linears.items()}, "Apply a plan to the model (structure) it was made for.",
        )  # fmt: skip
        attr_name = "fused_" + "_".join(group.members)
        fused = FusedLinear.from_linears(linears, attr_name)
        _insert_before(parent, attr_name, fused, group.members[0])
        for index, name in enumerate(group.members):
            member = FusedProjection(fused, index)
            member.train(linears[name].training)
            setattr(parent, name, member)
        if not any(isinstance(c, FusedLinear) for n, c in parent._modules.items() if n != attr_name):
            parent.register_load_state_dict_pre_hook(_load_into_groups)
        fused.register_load_state_dict_post_hook(_missing_as_original)
    _bound_lifetimes(model)
    return model


def _bound_lifetimes(model: nn.Module) -> None:
    """One forward hook on ``model`` (replacing an earlier one) that resets every group in it."""
    for key, hook in list(model._forward_hooks.items()):
        if isinstance(hook, functools.partial) and hook.func is _reset_groups:
            del model._forward_hooks[key]
            model._forward_hooks_always_called.pop(key, None)
    groups = tuple(m for m in model.modules() if isinstance(m, FusedLinear))
    if groups:
        model.register_forward_hook(functools.partial(_reset_groups, groups), always_call=True)


def _insert_before(parent: nn.Module, name: str, module: nn.Module, before: str) -> None:
    """Register ``module`` as ``name`` just before child ``before`` (state-dict keys keep the original order)."""
    check_arg(not hasattr(parent, name), "plan", f"a free attribute name {name!r} in {type(parent).__name__}", name)
    items = list(parent._modules.items())
    parent._modules.clear()
    for key, child in items:
        if key == before:
            parent._modules[name] = module
        parent._modules[key] = child


def fused_groups(model: nn.Module) -> FusionPlan:
    """The plan that :func:`apply_fusion` applied to ``model`` (read from its modules), e.g. to save it."""
    groups = []
    for fqn, module in model.named_modules():
        for child in module._modules.values():
            if isinstance(child, FusedLinear):
                groups.append(FusionGroup(fqn, child.names, child.widths))
    return FusionPlan(tuple(groups))
