"""Construct models without running their initialisers; the zoo then fills in seeded random weights.

The libraries' own initialisers (trunc_normal_ over 300M ViT-L weights) take several seconds on a
small CPU and are then overwritten anyway.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def torch_module(factory: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    """``factory()`` built on the meta device, then given uninitialised storage in ``dtype`` on the default
    device (the CPU; none under ``torch.device("meta")``, where the model stays shapes only).

    Only for modules without buffers, whose values would be lost (torchvision ViT, nn.Transformer).
    """
    with torch.device("meta"):
        model = factory()
    assert next(model.buffers(), None) is None, f"{type(model).__name__} has buffers that meta construction would lose"
    return model.to(dtype=dtype).to_empty(device=torch.get_default_device())


def transformers_model(cls: type, config, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """``cls`` from ``config`` without weight init; buffers (position ids, RoPE) are computed as usual.

    Skipping init also skips the tying of input and output embeddings (GPT-2, T5), so it is redone here.
    """
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        model = cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    model.tie_weights()
    return model
