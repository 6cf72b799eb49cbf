"""Model-level context parallelism: a model's attention runs on sequence shards across a process group.

Inside ``with context_parallel(model, group=...)`` every attention call of the model runs the
chosen context-parallel method on this rank's shard of the sequence:

* transformers models, through their attention interface: the block registers the attention
  function ``"attnkit_context_parallel"`` (and a mask function that builds no mask, since the
  sharded causal/sliding-window mask lives in the ring's schedule) and switches the model to it,
  restoring the model's own implementation on exit;
* attnkit ``MultiHeadAttention`` modules, through the op's backend registry: their ``backend``
  becomes ``"context_parallel"`` for the block.

The inputs are this rank's shard (``shard_lm_batch`` for a causal LM: token ids, global position
ids for the rotary embedding, and labels shifted *before* sharding). Each rank's loss is its share of
the global mean, and parameter gradients are summed over the group afterwards (as DDP does)::

    with context_parallel(model, group=cp_group):
        batch = shard_lm_batch(input_ids, labels, group=cp_group)
        model(**batch).loss.backward()
    for p in model.parameters():
        dist.all_reduce(p.grad, group=cp_group)     # or let DDP/FSDP over the same ranks do it

What raises instead of running wrong: padding masks (a 2-D ``attention_mask`` with zeros), packed
sequences passed to the model, KV caches (generation), attention dropout in training, logit
soft-capping and attention sinks, an ``attn_mask`` on ``MultiHeadAttention``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from attnkit.errors import UnsupportedError, check_arg, check_type
from attnkit.parallel.allgather import allgather_attention
from attnkit.parallel.comm import group_info
from attnkit.parallel.layout import LAYOUTS, shard_positions, shard_sequence
from attnkit.parallel.ring import ring_attention
from attnkit.parallel.ulysses import ulysses_attention

__all__ = ["ContextParallelConfig", "context_parallel", "shard_lm_batch", "CONTEXT_PARALLEL"]

CONTEXT_PARALLEL = "attnkit_context_parallel"
"""The transformers attention-implementation name; ``"context_parallel"`` is the ``attnkit.ops`` backend."""
_BACKEND = "context_parallel"
_METHODS = {"ring": ring_attention, "allgather": allgather_attention, "ulysses": ulysses_attention}
# transformers keywords that change the result and that the context-parallel methods cannot compute.
_REFUSED = ("softcap", "s_aux", "sinks", "cu_seq_lens_q", "cu_seq_lens_k", "output_attentions")


@dataclass(frozen=True)
class ContextParallelConfig:
    """How ``context_parallel`` runs a model's attention."""

    group: dist.ProcessGroup | None = None
    """The context-parallel process group (None = the whole world)."""
    layout: str = "zigzag"
    """How the sequence is sharded (``parallel.layout``); inputs must be sharded the same way."""
    method: str = "ring"
    """``"ring"`` (any length, sliding windows), ``"allgather"`` (short sequences, GQA) or ``"ulysses"`` (heads % ranks == 0)."""

    def __post_init__(self) -> None:
        check_arg(self.layout in LAYOUTS, "layout", f"one of {LAYOUTS}", self.layout)
        check_arg(self.method in _METHODS, "method", f"one of {sorted(_METHODS)}", self.method)

    def attend(self, q, k, v, *, causal: bool, scale: float | None, window: int | None) -> torch.Tensor:
        """Context-parallel attention of the local shards ``(B, H, S_local, D)``."""
        if window is not None and self.method != "ring":
            raise UnsupportedError(f"sliding_window: only method='ring' runs sliding windows under context parallelism, not {self.method!r}")
        extra = {"window": window} if window is not None else {}
        return _METHODS[self.method](q, k, v, group=self.group, causal=causal, scale=scale, layout=self.layout, **extra)


_ACTIVE: contextvars.ContextVar[ContextParallelConfig | None] = contextvars.ContextVar("attnkit_context_parallel", default=None)


def _active(what: str) -> ContextParallelConfig:
    config = _ACTIVE.get()
    if config is None:
        raise UnsupportedError(f"{what}: context-parallel attention runs only inside `with attnkit.parallel.context_parallel(model, ...)`")
    return config


# ---------------------------------------------------------------- transformers


def _hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, sliding_window=None, **kwargs):
    """transformers' attention-function contract: q ``(B, Hq, S_local, D)``, k/v ``(B, Hkv, S_local, D)``
    -> ``(out (B, S_local, Hq, Dv), None)``."""
    config = _active("attention")
    for name in _REFUSED:
        if kwargs.get(name) not in (None, False):
            raise UnsupportedError(f"{name}: not supported under context parallelism")
    if attention_mask is not None:
        raise UnsupportedError("attention_mask: a model-built mask cannot be sharded; context parallelism takes causal/sliding-window models without padding")
    if dropout and module.training:
        raise UnsupportedError(f"dropout: attention dropout ({dropout}) is not supported under context parallelism; set attention_dropout=0")
    if key.shape[2] != query.shape[2]:
        raise UnsupportedError(f"key length {key.shape[2]} != query length {query.shape[2]}: KV caches (generation) are not supported; pass use_cache=False")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    out = config.attend(query, key, value, causal=causal, scale=scaling, window=sliding_window)
    return out.transpose(1, 2).contiguous(), None


def _hf_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """transformers' mask-function contract; the ring builds causal/window masks from global positions."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise UnsupportedError("attention_mask: padding masks are not supported under context parallelism; pack without padding")
    return None


def _register_hf() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CONTEXT_PARALLEL, _hf_attention)
    AttentionMaskInterface.register(CONTEXT_PARALLEL, _hf_mask)


# ---------------------------------------------------------------- attnkit.ops backend (MultiHeadAttention)


def _support(spec) -> str | None:
    if spec.mask != "none":
        return "context-parallel attention takes no mask tensor (causal and sliding windows only)"
    if spec.dropout_p:
        return "no attention dropout under context parallelism"
    return None


def _run(q, k, v, options):
    """``attnkit.ops`` backend: ``options`` of a causal or full call on local shards."""
    config = _active("backend 'context_parallel'")
    if options.q_start is not None or options.kv_start is not None:
        raise UnsupportedError("q_start/kv_start: context-parallel shards take their positions from the layout")
    out = config.attend(q, k, v, causal=options.causal, scale=options.scale, window=None)
    return out, None


def _register_backend() -> None:
    from attnkit.ops import register_backend
    from attnkit.ops.registry import BACKENDS

    if _BACKEND not in BACKENDS:
        register_backend(_BACKEND, _support, _run, summary="context-parallel attention over sequence shards (parallel.context_parallel)")


@contextlib.contextmanager
def context_parallel(
    model: nn.Module, *, group: dist.ProcessGroup | None = None, mesh=None, layout: str = "zigzag", method: str = "ring"
) -> Iterator[ContextParallelConfig]:
    """Run ``model``'s attention context-parallel on sequence shards inside the block.

    Args:
        model: a transformers ``PreTrainedModel`` (attention through ``ALL_ATTENTION_FUNCTIONS``)
            and/or a module holding attnkit ``MultiHeadAttention`` layers.
        group: the context-parallel process group; or ``mesh``: a 1-D ``DeviceMesh`` of it.
        layout: the layout the inputs were sharded with (``shard_lm_batch`` / ``shard_sequence``).
        method: ``"ring"``, ``"allgather"`` or ``"ulysses"``.

    Yields the :class:`ContextParallelConfig` in force. Restores the model's attention on exit.

    Example::

        with context_parallel(model, group=None, layout="zigzag"):
            loss = model(**shard_lm_batch(input_ids, labels)).loss
            loss.backward()
    """
    check_type(model, nn.Module, "model")
    if mesh is not None:
        check_type(mesh, DeviceMesh, "mesh")
        check_arg(group is None and mesh.ndim == 1, "mesh", "a 1-D DeviceMesh (and no group)", mesh)
        group = mesh.get_group()
    config = ContextParallelConfig(group=group, layout=layout, method=method)
    _register_backend()
    from attnkit.nn import MultiHeadAttention

    swapped = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    saved_configs = [m.config for m in swapped]
    hf_config = getattr(model, "config", None)
    hf_saved = getattr(hf_config, "_attn_implementation", None) if hasattr(model, "set_attn_implementation") else None
    plain = [fqn for fqn, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if plain:
        raise UnsupportedError(f"model: torch.nn.MultiheadAttention at {plain[0]!r}; convert it with attnkit.nn first (its backend registry runs context parallelism)")
    if hf_saved is None and not swapped:
        raise UnsupportedError("model: neither a transformers model nor one with attnkit MultiHeadAttention layers; nothing would run context-parallel")
    token = _ACTIVE.set(config)
    try:
        for module in swapped:
            module.config = dataclasses.replace(module.config, backend=_BACKEND)
        if hf_saved is not None:
            _register_hf()
            model.set_attn_implementation(CONTEXT_PARALLEL)
        yield config
    finally:
        if hf_saved is not None:
            model.set_attn_implementation(hf_saved)
        for module, saved in zip(swapped, saved_configs):
            module.config = saved
        _ACTIVE.reset(token)


def shard_lm_batch(
    input_ids: torch.Tensor, labels: torch.Tensor | None = None, group: dist.ProcessGroup | None = None, *, layout: str = "zigzag", ignore_index: int = -100
) -> dict[str, torch.Tensor]:
    """This rank's shard of a causal-LM batch, as keywords for a transformers model's forward.

    Args:
        input_ids: ``(B, S)`` token ids, the whole sequence (the same on every rank).
        labels: ``(B, S)``; shifted by one *before* sharding (position ``i`` predicts ``labels[i+1]``).
        group, layout: the context-parallel group and layout.

    Returns:
        ``input_ids (B, S/W)``, ``position_ids (B, S/W)`` (global, for the rotary embedding),
        ``use_cache=False``, and with labels ``labels``/``shift_labels (B, S/W)`` and
        ``num_items_in_batch`` (the global count of labelled tokens, so each rank's loss is its
        share of the global mean and the ranks' losses sum to it).
    """
    check_arg(input_ids.dim() == 2, "input_ids", "a (batch, seq) tensor", tuple(input_ids.shape))
    rank, world_size = group_info(group)
    positions = shard_positions(input_ids.shape[1], world_size, rank, layout, device=input_ids.device)
    batch = {"input_ids": shard_sequence(input_ids, group, dim=1, layout=layout), "position_ids": positions.expand(input_ids.shape[0], -1), "use_cache": False}
    if labels is not None:
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)
        local = shard_sequence(shifted, group, dim=1, layout=layout)
        batch.update(labels=local, shift_labels=local, num_items_in_batch=(shifted != ignore_index).sum())
    return batch
