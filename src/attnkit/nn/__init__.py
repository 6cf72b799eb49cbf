"""Attention layers built on `attnkit.ops.attention`, and conversions from/to ``torch.nn.MultiheadAttention``.

Mask conventions follow ``nn.MultiheadAttention`` at this layer (bool True = masked out) and are
translated once, in :mod:`attnkit.nn.masks`, to the ops convention (bool True = may attend).
"""

from attnkit.nn.config import MultiHeadAttentionConfig
from attnkit.nn.convert import from_torch, swap_attention, to_torch
from attnkit.nn.fast_path import why_not_fast_path
from attnkit.nn.kv_cache import KVCache
from attnkit.nn.multihead import MultiHeadAttention
from attnkit.nn.nested import disable_nested_tensor

__all__ = [
    # layers
    "MultiHeadAttention",
    "MultiHeadAttentionConfig",
    "why_not_fast_path",
    # incremental decoding and streaming
    "KVCache",
    # torch interop
    "from_torch",
    "to_torch",
    "swap_attention",
    "disable_nested_tensor",
]
