"""The one module swap: replace every submodule a filter accepts with what a factory builds.

`swap_attention` (``nn.MultiheadAttention`` -> attnkit's layer), `optimize`'s rewrites and
`convert_to_float8_training` are all this walk with a different filter and factory, following
torchao's convention: the filter sees ``(module, fqn)``, the dotted path from the root.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from attnkit.errors import check_type

__all__ = ["ModuleFilterFn", "ModuleFactory", "swap_modules"]

ModuleFilterFn = Callable[[nn.Module, str], bool]
"""``(module, fqn) -> bool``: whether ``module``, found at dotted path ``fqn`` ("" for the root), is swapped."""
ModuleFactory = Callable[[nn.Module, str], "nn.Module | None"]
"""``(module, fqn) -> replacement``; None keeps the original (and the walk descends into it)."""


def swap_modules(model: nn.Module, filter_fn: ModuleFilterFn, factory: ModuleFactory) -> nn.Module:
    """Replace, in place, each submodule of ``model`` that ``filter_fn`` accepts with ``factory``'s result.

    The walk is top-down: a replaced module's children are not visited (the replacement owns them).
    A module reachable under several paths (tied or shared) is built once and the same replacement
    is put at every path, so sharing survives the swap. The root itself may be swapped.

    Returns:
        The model (a new object only when the root itself was replaced).
    """
    check_type(model, nn.Module, "model")
    done: dict[int, nn.Module] = {}

    def replacement(module: nn.Module, fqn: str) -> nn.Module | None:
        key = id(module)
        if key not in done:
            new = factory(module, fqn) if filter_fn(module, fqn) else None
            done[key] = module if new is None else new
            if new is None:
                _visit(module, fqn)
        new = done[key]
        return None if new is module else new

    def _visit(parent: nn.Module, prefix: str) -> None:
        # ``_modules`` rather than ``named_children()``: the latter yields a shared child only once,
        # and every slot that holds it must get the replacement.
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            new = replacement(child, f"{prefix}.{name}" if prefix else name)
            if new is not None:
                setattr(parent, name, new)

    root = replacement(model, "")
    return model if root is None else root
