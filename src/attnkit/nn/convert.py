"""Conversions between ``torch.nn.MultiheadAttention`` and :class:`MultiHeadAttention`, and the model-wide swap.

Conversions share the parameter objects instead of copying them, so tied weights, optimizers
built before the swap and ``state_dict`` keys all keep working.
"""

from __future__ import annotations

from torch import nn

from attnkit.errors import UnsupportedError, check_type
from attnkit.nn.multihead import MultiHeadAttention
from attnkit.nn.nested import disable_nested_tensor
from attnkit.utils import ModuleFilterFn, swap_modules

__all__ = ["from_torch", "to_torch", "swap_attention"]


def _share_parameters(source: nn.Module, target: nn.Module) -> None:
    """Make ``target`` hold ``source``'s parameter objects; both use nn.MultiheadAttention's names."""
    target_names = sorted(name for name, _ in target.named_parameters(remove_duplicate=False))
    source_params = dict(source.named_parameters(remove_duplicate=False))
    assert target_names == sorted(source_params), (target_names, sorted(source_params))
    for name, param in source_params.items():
        owner_path, _, attr = name.rpartition(".")
        owner = target.get_submodule(owner_path)
        assert getattr(owner, attr).shape == param.shape, (name, getattr(owner, attr).shape, param.shape)
        setattr(owner, attr, param)
    target.train(source.training)


def from_torch(module: nn.MultiheadAttention, *, backend: str = "auto") -> MultiHeadAttention:
    """A :class:`MultiHeadAttention` that computes what ``module`` computes, sharing its parameters.

    Every ``nn.MultiheadAttention`` is representable (including ``kdim``/``vdim``, ``bias=False``,
    ``add_bias_kv``, ``add_zero_attn``, ``batch_first`` either way). Outputs match within float
    rounding, except rows with no allowed key: zeros here, NaN in torch.

    Example::

        mha = from_torch(nn.MultiheadAttention(256, 8, batch_first=True), backend="math")
    """
    check_type(module, nn.MultiheadAttention, "module")
    converted = MultiHeadAttention(
        module.embed_dim,
        module.num_heads,
        kdim=module.kdim,
        vdim=module.vdim,
        bias=module.in_proj_bias is not None,
        add_bias_kv=module.bias_k is not None,
        add_zero_attn=module.add_zero_attn,
        dropout=module.dropout,
        batch_first=module.batch_first,
        backend=backend,
        device="meta",  # the parameters come from `module`; skip allocating and initializing new ones
    )
    _share_parameters(module, converted)
    return converted


def _torch_incompatibilities(module: MultiHeadAttention) -> list[str]:
    cfg = module.config
    problems = []
    if cfg.num_kv_heads != cfg.num_heads:
        problems.append(f"num_kv_heads={cfg.num_kv_heads} != num_heads={cfg.num_heads} (GQA/MQA)")
    if cfg.head_dim * cfg.num_heads != cfg.embed_dim:
        problems.append(f"head_dim={cfg.head_dim} != embed_dim // num_heads={cfg.embed_dim // cfg.num_heads}")
    if cfg.v_head_dim != cfg.head_dim:
        problems.append(f"v_head_dim={cfg.v_head_dim} != head_dim={cfg.head_dim}")
    if cfg.softmax_scale != cfg.head_dim**-0.5:
        problems.append(f"scale={cfg.scale} != 1/sqrt(head_dim)")
    return problems


def to_torch(module: MultiHeadAttention) -> nn.MultiheadAttention:
    """An ``nn.MultiheadAttention`` that computes what ``module`` computes, sharing its parameters.

    ``backend`` and ``query_chunk_size`` do not change results and are dropped.

    Raises:
        UnsupportedError: naming each feature torch has no equivalent for (GQA/MQA, a head size
            other than ``embed_dim // num_heads``, ``v_head_dim != head_dim``, a custom ``scale``).
    """
    check_type(module, MultiHeadAttention, "module")
    problems = _torch_incompatibilities(module)
    if problems:
        raise UnsupportedError(f"to_torch: nn.MultiheadAttention has no equivalent of: {'; '.join(problems)}.")
    cfg = module.config
    converted = nn.MultiheadAttention(
        cfg.embed_dim,
        cfg.num_heads,
        dropout=cfg.dropout,
        bias=cfg.bias,
        add_bias_kv=cfg.add_bias_kv,
        add_zero_attn=cfg.add_zero_attn,
        kdim=cfg.kdim,
        vdim=cfg.vdim,
        batch_first=cfg.batch_first,
        device="meta",
    )
    _share_parameters(module, converted)
    return converted


def swap_attention(
    model: nn.Module, *, module_filter_fn: ModuleFilterFn | None = None, backend: str = "auto"
) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (in place) by :func:`from_torch` of it.

    Args:
        model: any module; torch's ``nn.Transformer*`` layers keep working (they call the new
            module with the same keyword arguments).
        module_filter_fn: ``(module, fqn) -> bool``; only matching attention modules are replaced.
        backend: the ``attnkit.ops`` backend of the new modules.

    Returns:
        ``model`` (or the converted module when ``model`` itself is an ``nn.MultiheadAttention``).

    Built on :func:`attnkit.utils.swap_modules` (shared modules stay shared), then
    :func:`disable_nested_tensor`: an eval-mode ``nn.TransformerEncoder`` would otherwise hand
    nested tensors to the new attention, which only torch's fused kernel accepts. Parameters are
    shared, but hooks registered on the replaced modules are not carried over.

    Example::

        model = swap_attention(model, module_filter_fn=lambda m, fqn: fqn.startswith("encoder"))
    """
    check_type(model, nn.Module, "model")

    def wanted(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.MultiheadAttention) and (module_filter_fn is None or module_filter_fn(module, fqn))

    model = swap_modules(model, wanted, lambda module, fqn: from_torch(module, backend=backend))
    disable_nested_tensor(model)
    return model
