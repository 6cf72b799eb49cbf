"""The module swap: walk a model, rewrite every recognised attention (and patchify convolution), list what was left alone."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from torch import nn

from attnkit.nn import from_torch
from attnkit.optimize.config import OptimizeConfig
from attnkit.optimize.families import match_family
from attnkit.optimize.hf_attention import HFAttention
from attnkit.optimize.patchify import PatchifyGEMM, is_patchify

__all__ = ["Rewrite", "Skip", "ModuleFilterFn", "rewrite_modules"]

ModuleFilterFn = Callable[[nn.Module, str], bool]
"""``(module, fqn) -> bool``: whether to rewrite ``module`` (an attention or a patchify convolution), found at dotted path ``fqn``."""

_ATTENTION_LIKE = re.compile(r"attn|attention", re.IGNORECASE)


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


def _describe_hf(module: HFAttention) -> str:
    core = module.core
    projection = {"fused": "Q/K/V fused into one GEMM", "packed": "already packed Q/K/V kept", "separate": "separate Q/K/V kept"}
    heads = f"{core.num_heads} heads" + (f", {core.num_kv_heads} KV heads (GQA)" if core.num_kv_heads != core.num_heads else "")
    return f"{projection[module.projection]}; {heads} x {core.head_dim}; scale {core.scale:.4g}"


def _convert(module: nn.Module, config: OptimizeConfig) -> tuple[nn.Module | None, str, str]:
    """(replacement or None, family, detail or the reason it was not converted)."""
    if isinstance(module, nn.MultiheadAttention):
        if not config.rewrite_mha:
            return None, "torch", "rewrite_mha=False"
        new = from_torch(module, backend=config.backend)
        return new, "torch", f"packed in-projection, {module.num_heads} heads; weights only when need_weights=True"
    family = match_family(module)
    if family is not None:
        if not config.rewrite_hf:
            return None, family.name, "rewrite_hf=False"
        new = HFAttention.from_original(module, family, fuse_qkv=config.fuse_qkv, backend=config.backend)
        return new, family.name, _describe_hf(new)
    if is_patchify(module):
        if not config.patchify_gemm:
            return None, "conv", "patchify_gemm=False"
        kh, kw = module.kernel_size
        new = PatchifyGEMM.from_conv(module)
        detail = f"stride == kernel {kh}x{kw}: patches by reshape + one GEMM ({module.in_channels * kh * kw} -> {module.out_channels})"
        return new, "conv", detail
    return None, "", "not a recognised attention class (see attnkit.optimize.FAMILIES)"


def _rewritable(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or match_family(module) is not None or is_patchify(module)


def rewrite_modules(model: nn.Module, config: OptimizeConfig, module_filter_fn: ModuleFilterFn | None = None) -> tuple[nn.Module, list[Rewrite], list[Skip]]:
    """Rewrite ``model`` in place; return ``(model or its replacement if the root was rewritten, rewrites, skips)``."""
    rewrites: list[Rewrite] = []
    skips: list[Skip] = []
    replaced: dict[int, nn.Module] = {}  # a module shared by several parents stays shared

    def visit(module: nn.Module, path: str) -> nn.Module | None:
        if id(module) in replaced:
            return replaced[id(module)]
        if not _rewritable(module):
            return None
        if module_filter_fn is not None and not module_filter_fn(module, path):
            skips.append(Skip(path, type(module).__name__, "module_filter_fn returned False"))
            return None
        new, family, detail = _convert(module, config)
        if new is None:
            skips.append(Skip(path, type(module).__name__, detail))
            return None
        replaced[id(module)] = new
        rewrites.append(Rewrite(path, type(module).__name__, type(new).__name__, family, detail))
        return new

    root = visit(model, "")
    if root is not None:
        return root, rewrites, skips
    touched: list[str] = []
    for parent_path, parent in list(model.named_modules()):
        if any(parent_path == p or parent_path.startswith(p + ".") for p in touched):
            continue  # inside a module that was just replaced
        for name, child in list(parent.named_children()):
            path = f"{parent_path}.{name}" if parent_path else name
            new = visit(child, path)
            if new is not None:
                setattr(parent, name, new)
                touched.append(path)
    _list_unrecognised(model, touched, skips)
    return model, rewrites, skips


def _list_unrecognised(model: nn.Module, touched: list[str], skips: list[Skip]) -> None:
    """Add attention-looking modules that neither hold, sit inside, nor are a rewrite or a listed skip."""
    known = touched + [skip.path for skip in skips]
    for path, module in model.named_modules():
        if not path or not _ATTENTION_LIKE.search(type(module).__name__):
            continue
        if any(k == path or k.startswith(path + ".") or path.startswith(k + ".") for k in known):
            continue
        skips.append(Skip(path, type(module).__name__, "not a recognised attention class (see attnkit.optimize.FAMILIES)"))
        known.append(path)
