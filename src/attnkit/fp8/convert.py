"""Swap a model's ``nn.Linear`` layers (and ``optimize``'s fused projection groups) for their FP8
versions and back (torchao's entry point)."""

from __future__ import annotations

from torch import nn

from attnkit.errors import check_type
from attnkit.fp8.auto_filter import keep_reason
from attnkit.fp8.config import Float8TrainingConfig
from attnkit.fp8.fused import Float8FusedLinear, repoint_members
from attnkit.fp8.fsdp import WeightWithFloat8AllGather
from attnkit.fp8.linear import Float8Linear
from attnkit.optimize.fuse import FusedLinear
from attnkit.utils.swap import ModuleFilterFn, swap_modules

__all__ = ["convert_to_float8_training", "convert_from_float8_training", "conversion_plan"]


def _convertible(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` or a fused projection group (one GEMM of the concatenated weight)."""
    return type(module) in (nn.Linear, FusedLinear)


def conversion_plan(model: nn.Module, *, config: Float8TrainingConfig | None = None,
                    module_filter_fn: ModuleFilterFn | None = None) -> dict[str, str | None]:
    """For every plain ``nn.Linear`` and fused projection group in ``model``: fqn -> None (converted) or why
    it stays high precision."""
    config = config or Float8TrainingConfig()
    plan = {}
    for fqn, module in model.named_modules():
        if _convertible(module):
            reason = keep_reason(module, config)
            if reason is None and module_filter_fn is not None and not module_filter_fn(module, fqn):
                reason = "excluded by module_filter_fn"
            plan[fqn] = reason
    return plan


def convert_to_float8_training(model: nn.Module, *, config: Float8TrainingConfig | None = None,
                               module_filter_fn: ModuleFilterFn | None = None) -> nn.Module:
    """Replace, in place, each ``nn.Linear`` of ``model`` that FP8 suits by a :class:`Float8Linear`.

    A fused projection group from ``attnkit.optimize`` (``FusedLinear``, whose members read one GEMM
    of the concatenated Q/K/V weight) becomes one :class:`Float8FusedLinear`, judged at
    the fused width.

    A layer is converted when its dims are aligned (16, or 128 for blockwise), the automatic filter
    (``config.auto_filter``) finds FP8 faster at its shape, and ``module_filter_fn(module, fqn)``
    (if given) returns True. Parameters are shared, not copied; state_dict keys are unchanged
    (the delayed recipe adds ``fp8_amax_history``). With ``config.enable_fsdp_float8_all_gather`` each
    converted ``Float8Linear``'s weight becomes a :class:`~attnkit.fp8.fsdp.WeightWithFloat8AllGather`
    (same values; call ``fully_shard`` after conversion); fused groups keep the high-precision all-gather.

    Args:
        model: the model (modified in place).
        config: recipe and filter settings; default tensorwise, no auto filter.
        module_filter_fn: ``(module, fqn) -> bool``, e.g. ``lambda m, fqn: fqn != "lm_head"``.

    Returns:
        The model.

    Example:
        >>> m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> m = convert_to_float8_training(m, config=Float8TrainingConfig(emulate=True))
        >>> [type(x).__name__ for x in m]
        ['Float8Linear', 'ReLU', 'Linear']
    """
    check_type(model, nn.Module, "model")
    config = config or Float8TrainingConfig()
    check_type(config, Float8TrainingConfig, "config")

    def accept(module: nn.Module, fqn: str) -> bool:
        if not _convertible(module) or keep_reason(module, config) is not None:
            return False
        return module_filter_fn is None or bool(module_filter_fn(module, fqn))

    def build(module: nn.Module, fqn: str) -> nn.Module:
        if isinstance(module, FusedLinear):
            new = Float8FusedLinear.from_fused(module, config)
            repoint_members(model, fqn, module, new)
            return new
        new = Float8Linear.from_float(module, config)
        if config.enable_fsdp_float8_all_gather:
            new.weight = nn.Parameter(WeightWithFloat8AllGather(new.weight.data, config),
                                      requires_grad=new.weight.requires_grad)
        return new

    return swap_modules(model, accept, build)


def convert_from_float8_training(model: nn.Module) -> nn.Module:
    """Turn every :class:`Float8Linear` back into ``nn.Linear`` (and :class:`Float8FusedLinear` into
    ``FusedLinear``) with the same parameter tensors."""
    check_type(model, nn.Module, "model")

    def build(module: nn.Module, fqn: str) -> nn.Module:
        if isinstance(module, Float8FusedLinear):
            new = module.to_fused()
            repoint_members(model, fqn, module, new)
            return new
        linear = module.to_linear()
        if isinstance(linear.weight, WeightWithFloat8AllGather):
            linear.weight = nn.Parameter(linear.weight._tensor, requires_grad=linear.weight.requires_grad)
        return linear

    return swap_modules(model, lambda module, fqn: isinstance(module, (Float8Linear, Float8FusedLinear)), build)
