"""FSDP2 (``fully_shard``) with the weights all-gathered in FP8, tensorwise recipe (torchao's
``enable_fsdp_float8_all_gather``).

With ``Float8TrainingConfig(enable_fsdp_float8_all_gather=True)``, :func:`convert_to_float8_training`
wraps each converted layer's weight in :class:`WeightWithFloat8AllGather`: the high-precision weight
(the optimizer, state_dict, ``.to`` and every other op see it unchanged) plus FSDP2's all-gather
extension. Before the all-gather each rank casts its shard to FP8 (E4M3) with one scale for the whole
weight; after it, the unsharded parameter is a :class:`Float8AllGatheredWeight` that ``Float8Linear``
uses as its already quantised weight. The all-gather moves 1 byte per element instead of 4 (fp32)
or 2 (bf16), and the weight is cast once per gather instead of once per layer call on the full tensor.

The scale is the global one: ``fsdp_pre_all_gather`` all-reduces (max) the shards' amaxes over the
FSDP mesh, as torchao does by default. That costs one 4-byte all-reduce per layer per all-gather but
cannot go stale: a precomputed scale (torchao's ``precompute_float8_dynamic_scale_for_fsdp``, one
batched all-reduce after the optimizer step) is wrong if the user forgets the call or loads new weights.
The FP8 bytes are then the ones the unsharded layer casts itself (same amax, same scale, same
elementwise cast), so the forward and both gradients equal the single-process layer's bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from attnkit.fp8.config import Float8TrainingConfig
from attnkit.fp8.scaling import Granularity, Quantized, compute_amax, quantize

__all__ = ["WeightWithFloat8AllGather", "Float8AllGatheredWeight"]

_aten = torch.ops.aten

_KEEP_SUBCLASS = {
    _aten.empty_like.default, _aten.new_zeros.default, _aten.slice.Tensor, _aten.copy_.default,
    _aten.view.default, _aten.as_strided.default, _aten._to_copy.default, _aten._pin_memory.default,
    _aten.split.Tensor, _aten.clone.default, _aten.detach.default, _aten.alias.default,
}
"""Ops whose results FSDP2 keeps as parameter data (sharding, padding, ``.to``, ``nn.Parameter``): they
return the wrapper, so the sharded local tensor still carries the all-gather extension."""


def _wrapper(cls, like: torch.Tensor, dtype: torch.dtype, requires_grad: bool = False) -> torch.Tensor:
    """A wrapper subclass instance with ``like``'s size, strides and device and ``dtype``."""
    return torch.Tensor._make_wrapper_subclass(
        cls, like.size(), strides=like.stride(), storage_offset=like.storage_offset(), dtype=dtype,
        layout=like.layout, device=like.device, requires_grad=requires_grad)


class WeightWithFloat8AllGather(torch.Tensor):
    """A high-precision weight (out, in) whose FSDP2 all-gather moves FP8 bytes and one scale.

    Every op runs on the wrapped tensor; the ops in ``_KEEP_SUBCLASS`` return the wrapper again.

    Args:
        tensor: the high-precision weight (or its FSDP shard).
        config: the layer's :class:`Float8TrainingConfig` (tensorwise): FP8 format and scale rounding.
    """

    _tensor: torch.Tensor
    _config: Float8TrainingConfig

    @staticmethod
    def __new__(cls, tensor: torch.Tensor, config: Float8TrainingConfig):
        new = _wrapper(cls, tensor, tensor.dtype, tensor.requires_grad)
        new._tensor, new._config = tensor, config
        return new

    def __repr__(self) -> str:
        return f"WeightWithFloat8AllGather(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        config = next(a._config for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, cls))
        args, kwargs = pytree.tree_map_only(cls, lambda t: t._tensor, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func not in _KEEP_SUBCLASS:
            return out
        return pytree.tree_map_only(torch.Tensor, lambda t: cls(t, config), out)

    def __tensor_flatten__(self):
        return ["_tensor"], self._config

    @staticmethod
    def __tensor_unflatten__(inner_tensors, config, outer_size, outer_stride):
        return WeightWithFloat8AllGather(inner_tensors["_tensor"], config)

    def fsdp_pre_all_gather(self, mesh, outer_size: torch.Size | None = None, outer_stride=None, module=None,
                            mp_policy=None) -> tuple[tuple[torch.Tensor], tuple[torch.Tensor]]:
        """FSDP2 hook: this rank's shard (rows, in) cast to FP8 with the global tensorwise scale.

        torch >= 2.6 passes all five arguments (FSDP2 reads the signature); only ``mesh`` and
        ``outer_size`` are used. An uneven last shard is padded with zero rows to the padded shard size
        ``ceil(out / world)``, as FSDP2 requires (the padding does not change the amax).

        Returns:
            ``((FP8 shard (rows, in) viewed as uint8,), (dequantisation scale, 0-d float32,))``.
        """
        fp8 = self._config.forward_format.dtype
        shard = self._tensor
        amax = (compute_amax(shard, Granularity.TENSOR) if shard.numel()
                else torch.zeros((), dtype=torch.float32, device=shard.device))
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())  # NaN stays NaN (overflow visible)
        q = quantize(shard, fp8, Granularity.TENSOR, amax=amax, power_of_2=self._config.power_of_2_scales)
        data = q.data
        if outer_size is not None:
            padded_rows = math.ceil(outer_size[0] / mesh.size())
            if data.shape[0] != padded_rows:
                data = torch.cat([data, data.new_zeros(padded_rows - data.shape[0], *data.shape[1:])])
        return (data.view(torch.uint8),), (q.scale,)  # raw bytes: gloo has no FP8 dtype

    def fsdp_post_all_gather(self, all_gather_outputs: tuple[torch.Tensor, ...], metadata: tuple[Any, ...],
                             param_dtype: torch.dtype, *, out: torch.Tensor | None = None):
        """FSDP2 hook: the gathered FP8 bytes (world * padded rows, in) become the unsharded weight.

        Returns:
            ``(Float8AllGatheredWeight, (fp8 data,))`` (the data is what FSDP frees after use), or None
            when ``out`` (the weight of an earlier gather, whose data shares the all-gather buffer) is
            updated in place.
        """
        (data,), (scale,) = all_gather_outputs, metadata
        data = data.view(self._config.forward_format.dtype)
        if out is not None:
            assert isinstance(out, Float8AllGatheredWeight), type(out)
            assert data.untyped_storage().data_ptr() == out._data.untyped_storage().data_ptr()
            out._scale = scale
            return None
        return Float8AllGatheredWeight(data, scale, param_dtype), (data,)


class Float8AllGatheredWeight(torch.Tensor):
    """The unsharded weight after an FP8 all-gather: FP8 data (rows, in) and its tensorwise
    dequantisation scale, presenting the shape and dtype of the high-precision parameter.

    FSDP2 may only view it whole (``as_strided``/``view`` to the full weight, ``detach``, ``alias``);
    :class:`~attnkit.fp8.Float8Linear` reads :meth:`quantized`. Rows beyond the weight's ``out``
    (uneven-shard padding) are ignored.

    Args:
        data: (rows >= out, in) FP8 data, contiguous.
        scale: 0-d float32 dequantisation scale.
        dtype: the dtype the parameter stands for (FSDP2's ``param_dtype``).
    """

    _data: torch.Tensor
    _scale: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        new = _wrapper(cls, data, dtype)
        new._data, new._scale = data, scale
        return new

    def __repr__(self) -> str:
        return f"Float8AllGatheredWeight(shape={tuple(self.shape)}, dtype={self.dtype}, fp8={self._data.dtype})"

    def quantized(self) -> Quantized:
        """The weight as the (out, in) tensorwise FP8 operand ``Float8Linear`` multiplies with."""
        return Quantized(self._data[: self.shape[0]], self._scale, Granularity.TENSOR)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self = args[0]
        if func in (_aten.detach.default, _aten.alias.default):
            return cls(self._data, self._scale, self.dtype)
        if func in (_aten.as_strided.default, _aten.view.default):  # FSDP2 trims the padded rows this way
            size, stride, offset = tuple(args[1]), tuple(args[2]) if len(args) > 2 else None, args[3:4] or (0,)
            rows, cols = self._data.shape
            whole = len(size) == 2 and size[1] == cols and size[0] <= rows
            if whole and stride in (None, (cols, 1)) and offset[0] in (None, 0):
                return cls(self._data[: size[0]], self._scale, self.dtype)
        raise NotImplementedError(
            f"{func} on an FP8 all-gathered weight: only Float8Linear's FP8 GEMMs read it. Use the sharded "
            "high-precision parameter, or set enable_fsdp_float8_all_gather=False.")
