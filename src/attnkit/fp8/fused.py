"""FP8 for ``optimize``'s fused projections: the group's one GEMM (``x @ W_all^T``) as one FP8 linear.

``optimize`` turns sibling ``nn.Linear`` layers that read the same tensor (Q/K/V, cross attention's K/V) into a
:class:`~attnkit.optimize.fuse.FusedLinear` holding the concatenated weight ``(sum(out_i), in)`` and
members (:class:`~attnkit.optimize.fuse.FusedProjection`) that slice its single GEMM. Those are no
longer ``nn.Linear``, so the group converts as a whole: :class:`Float8FusedLinear` is a
``FusedLinear`` whose ``forward`` (the fused GEMM every member reads) runs on FP8 operands.
Alignment and the speed table apply to the fused width, which is what the GEMM sees.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.errors import check_type
from attnkit.fp8.config import Float8TrainingConfig
from attnkit.fp8.linear import Float8Linear, _float8_forward, _init_float8_state
from attnkit.optimize.fuse import FusedLinear, FusedProjection

__all__ = ["Float8FusedLinear", "repoint_members"]


def _same_group_as(source: FusedLinear, target: FusedLinear) -> FusedLinear:
    """``target`` made to hold ``source``'s parameters, zero-bias buffer, load hooks and mode."""
    target.weight, target.bias = source.weight, source.bias
    target._zero_bias = source._zero_bias
    target._load_state_dict_post_hooks.update(source._load_state_dict_post_hooks)  # reports missing keys by their original names
    target.train(source.training)
    return target


def _empty_like(cls: type, fused: FusedLinear) -> FusedLinear:
    return cls(fused.names, fused.widths, fused.has_bias, fused.in_features, attr_name=fused.attr_name,
               device="meta", dtype=fused.weight.dtype)  # fmt: skip


class Float8FusedLinear(FusedLinear):
    """A :class:`FusedLinear` whose fused GEMM (forward and both backward GEMMs) runs in FP8.

    Same parameters, state_dict keys and members as the group it replaces (plus ``fp8_amax_history``
    for the delayed recipe, and the non-persistent ``fp8_overflow_counts``). A member called a
    second time with the same input (rare; the fused group then computes that member alone) runs
    its slice in high precision.
    """

    @classmethod
    def from_fused(cls, fused: FusedLinear, config: Float8TrainingConfig | None = None) -> "Float8FusedLinear":
        """A ``Float8FusedLinear`` sharing ``fused``'s parameters; call :func:`repoint_members` next."""
        check_type(fused, FusedLinear, "fused")
        new = _same_group_as(fused, _empty_like(cls, fused))
        _init_float8_state(new, config or Float8TrainingConfig(), fused.weight.device)
        return new

    def to_fused(self) -> FusedLinear:
        """A plain :class:`FusedLinear` sharing this group's parameters (bit-identical weights)."""
        return _same_group_as(self, _empty_like(FusedLinear, self))

    reset_amax_history = Float8Linear.reset_amax_history

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in) -> (..., sum(out_i))`` in the fused layout, in x's dtype."""
        return _float8_forward(self, x, self.weight, self.full_bias())

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """The members' original entries, plus ``fp8_amax_history`` (delayed) under this group's name."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.fp8_amax_history is not None:
            destination[f"{prefix}fp8_amax_history"] = self.fp8_amax_history if keep_vars else self.fp8_amax_history.detach()

    def extra_repr(self) -> str:
        emulated = ", emulate=True" if self.config.emulate else ""
        return f"{super().extra_repr()}, recipe={self.config.recipe.value}{emulated}"


def repoint_members(model: nn.Module, fqn: str, old: FusedLinear, new: FusedLinear) -> None:
    """Make the members of group ``old`` (siblings of it at ``fqn`` in ``model``) read ``new``."""
    parent_name = fqn.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    for child in parent._modules.values():
        if isinstance(child, FusedProjection) and child._group is old:
            object.__setattr__(child, "_group", new)  # not a child module: the group belongs to the parent
