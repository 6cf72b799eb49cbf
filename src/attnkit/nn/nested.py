"""Turning off ``nn.TransformerEncoder``'s nested-tensor fast path once its layers hold non-torch modules.

In eval mode, with a ``src_key_padding_mask`` and no ``mask``, ``nn.TransformerEncoder`` packs
the batch into a nested tensor and hands it to every layer; only torch's own modules (its fused
attention kernel) accept one. Any swap that puts other modules into an encoder (attnkit's
attention, an optimized or FP8 layer) must call :func:`disable_nested_tensor` afterwards. The
padded batch then stays dense; the outputs at real positions are the same.
"""

from __future__ import annotations

from torch import nn

from attnkit.errors import check_type

__all__ = ["disable_nested_tensor"]


def _only_torch_modules(module: nn.Module) -> bool:
    return all(type(m).__module__.startswith("torch.") for m in module.modules())


def disable_nested_tensor(model: nn.Module) -> list[str]:
    """Set ``use_nested_tensor = False`` on each ``nn.TransformerEncoder`` in ``model`` whose layers hold
    a module that is not torch's own; return their dotted paths (``""`` for the root).

    Encoders made only of torch modules keep their fast path.

    Example::

        swap_modules(model, filter_fn, factory)
        disable_nested_tensor(model)
    """
    check_type(model, nn.Module, "model")
    changed = []
    for fqn, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoder) and module.use_nested_tensor and not _only_torch_modules(module.layers):
            module.use_nested_tensor = False
            changed.append(fqn)
    return changed
