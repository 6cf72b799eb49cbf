"""ViT-B/16 and ViT-L/16 image classifiers: torchvision where it imports, else transformers with identical dimensions.

Both take ``(B, 3, 224, 224)`` images, cut into 196 patches of 16x16 plus a class token (197 tokens),
and return 1000-class logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.models._construct import torch_module, transformers_model
from attnkit.models.base import ZooModel


@dataclass(frozen=True)
class _ViTDims:
    torchvision_name: str
    hidden: int
    layers: int
    heads: int
    mlp: int


_IMAGE_SIZE, _PATCH, _CLASSES = 224, 16, 1000


def vit_b_16(batch_size: int, seq_len: None, dtype: torch.dtype, attn: str) -> ZooModel:
    """ViT-B/16: hidden 768, 12 layers, 12 heads, MLP 3072 (86M parameters)."""
    return _vit(_ViTDims("vit_b_16", 768, 12, 12, 3072), batch_size, dtype, attn)


def vit_l_16(batch_size: int, seq_len: None, dtype: torch.dtype, attn: str) -> ZooModel:
    """ViT-L/16: hidden 1024, 24 layers, 16 heads, MLP 4096 (304M parameters)."""
    return _vit(_ViTDims("vit_l_16", 1024, 24, 16, 4096), batch_size, dtype, attn)


def _vit(dims: _ViTDims, batch_size: int, dtype: torch.dtype, attn: str) -> ZooModel:
    images = torch.randn(batch_size, 3, _IMAGE_SIZE, _IMAGE_SIZE)
    try:
        import torchvision.models
    except Exception as error:  # a torchvision built for another torch fails with RuntimeError, not ImportError
        import transformers

        config = transformers.ViTConfig(
            image_size=_IMAGE_SIZE,
            patch_size=_PATCH,
            hidden_size=dims.hidden,
            num_hidden_layers=dims.layers,
            num_attention_heads=dims.heads,
            intermediate_size=dims.mlp,
            num_labels=_CLASSES,
        )
        model = transformers_model(transformers.ViTForImageClassification, config, dtype, attn)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        source = "transformers"
        notes = (
            f"torchvision not importable here ({reason}); transformers {transformers.__version__} "
            f"ViTForImageClassification with identical dimensions, attn_implementation={attn!r}"
        )
    else:
        model = torch_module(lambda: getattr(torchvision.models, dims.torchvision_name)(weights=None), dtype)
        source = "torchvision"
        notes = (
            f"torchvision {torchvision.__version__} {dims.torchvision_name}(weights=None); "
            "nn.MultiheadAttention, attn_implementation does not apply"
        )
    return ZooModel(dims.torchvision_name, model, (images,), {}, source, "vit", notes)
