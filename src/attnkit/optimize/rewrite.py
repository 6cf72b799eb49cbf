"""The module swap: walk a model, rewrite every recognised attention (and patchify convolution), list what was left alone."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace

from torch import nn

from attnkit.nn import MultiHeadAttention, from_torch
from attnkit.optimize.config import OptimizeConfig
from attnkit.optimize.patchify import PatchifyGEMM, is_patchify
from attnkit.utils import ModuleFilterFn, swap_modules

__all__ = ["Rewrite", "Skip", "ModuleFilterFn", "rewrite_modules", "nested_tensor_twin"]

_ATTENTION_LIKE = re.compile(r"attn|attention", re.IGNORECASE)
_UNRECOGNISED = "not nn.MultiheadAttention, and not the attention of a transformers model that switched to attn_implementation='attnkit'"


@dataclass(frozen=True)
class Rewrite:
    """One module that was replaced."""

    path: str
    before: str
    after: str
    family: str
    detail: str


@dataclass(frozen=True)
class Skip:
    """One attention-like module that was left alone, and why."""

    path: str
    module_class: str
    reason: str


def _convert(module: nn.Module, config: OptimizeConfig) -> tuple[nn.Module | None, str, str]:
    """(replacement or None, family, detail or the reason it was not converted)."""
    if isinstance(module, nn.MultiheadAttention):
        if not config.rewrite_mha:
            return None, "torch", "rewrite_mha=False"
        new = from_torch(module, backend=config.backend)
        return new, "torch", f"packed in-projection, {module.num_heads} heads; weights only when need_weights=True"
    if is_patchify(module):
        if not config.patchify_gemm:
            return None, "conv", "patchify_gemm=False"
        kh, kw = module.kernel_size
        new = PatchifyGEMM.from_conv(module)
        detail = f"stride == kernel {kh}x{kw}: patches by reshape + one GEMM ({module.in_channels * kh * kw} -> {module.out_channels})"
        return new, "conv", detail
    return None, "", _UNRECOGNISED


def _rewritable(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or is_patchify(module)


def rewrite_modules(model: nn.Module, config: OptimizeConfig, module_filter_fn: ModuleFilterFn | None = None) -> tuple[nn.Module, list[Rewrite], list[Skip]]:
    """Rewrite ``model`` in place; return ``(model or its replacement if the root was rewritten, rewrites, skips)``.

    The walk is :func:`attnkit.utils.swap_modules` (shared modules stay shared). Every
    ``nn.TransformerEncoder`` whose layers now hold attnkit attention gets ``use_nested_tensor = False``:
    in eval with a ``src_key_padding_mask`` it would otherwise pack the batch into a nested tensor,
    which only torch's own attention accepts.
    """
    rewrites: list[Rewrite] = []
    skips: list[Skip] = []

    def factory(module: nn.Module, fqn: str) -> nn.Module | None:
        if module_filter_fn is not None and not module_filter_fn(module, fqn):
            skips.append(Skip(fqn, type(module).__name__, "module_filter_fn returned False"))
            return None
        new, family, detail = _convert(module, config)
        if new is None:
            skips.append(Skip(fqn, type(module).__name__, detail))
            return None
        rewrites.append(Rewrite(fqn, type(module).__name__, type(new).__name__, family, detail))
        return new

    result = swap_modules(model, lambda module, fqn: _rewritable(module), factory)
    if result is not model:
        return result, rewrites, skips
    rewrites = _without_nested_tensors(model, rewrites)
    _list_unrecognised(model, [r.path for r in rewrites], skips)
    return model, rewrites, skips


def _without_nested_tensors(model: nn.Module, rewrites: list[Rewrite]) -> list[Rewrite]:
    """Turn off the nested-tensor path of encoders whose attention was rewritten; say so in their rewrites."""
    encoders = [
        path for path, module in model.named_modules()
        if isinstance(module, nn.TransformerEncoder)
        and any(isinstance(getattr(layer, "self_attn", None), MultiHeadAttention) for layer in module.layers)
    ]  # fmt: skip
    for path in encoders:
        model.get_submodule(path).use_nested_tensor = False
    note = "; nested-tensor fast path of the enclosing nn.TransformerEncoder turned off (padding stays padded)"
    return [
        replace(r, detail=r.detail + note) if any(path == "" or r.path.startswith(path + ".") for path in encoders) else r
        for r in rewrites
    ]


def nested_tensor_twin(reference: nn.Module, rewritten: nn.Module) -> tuple[nn.Module, str | None]:
    """``reference`` as the equivalence check should run it, and a note when that differs from it.

    Where :func:`rewrite_modules` turned an encoder's nested-tensor path off, the original's eval
    outputs at padded positions are zeros (the nested path drops them) while the rewritten model,
    like torch's own padded path, computes them from the valid keys. The check then compares
    against a copy of ``reference`` with the same encoders' nested path off: torch computes valid
    positions identically on both paths, so every position can be compared.
    """
    paths = [
        path for path, module in rewritten.named_modules()
        if isinstance(module, nn.TransformerEncoder) and not module.use_nested_tensor
    ]  # fmt: skip
    turned = [path for path in paths if getattr(_submodule(reference, path), "use_nested_tensor", False)]
    if not turned:
        return reference, None
    twin = copy.deepcopy(reference)
    for path in turned:
        twin.get_submodule(path).use_nested_tensor = False
    where = ", ".join(path or "<root>" for path in turned)
    return twin, f"checked against the original with the nested-tensor path of {where} off (as rewritten; padded positions are then computed, not zeroed)"


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _list_unrecognised(model: nn.Module, touched: list[str], skips: list[Skip]) -> None:
    """Add attention-looking modules that neither hold, sit inside, nor are a rewrite or a listed skip."""
    known = touched + [skip.path for skip in skips]
    for path, module in model.named_modules():
        if not path or not _ATTENTION_LIKE.search(type(module).__name__):
            continue
        if any(k == path or k.startswith(path + ".") or path.startswith(k + ".") for k in known):
            continue
        skips.append(Skip(path, type(module).__name__, _UNRECOGNISED))
        known.append(path)
