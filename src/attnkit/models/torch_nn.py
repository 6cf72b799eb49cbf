"""``torch.nn.Transformer`` of the zoo: the "Attention Is All You Need" base encoder-decoder, batch first."""

from __future__ import annotations

import torch
from torch import nn

from attnkit.models._construct import torch_module
from attnkit.models.base import ZooModel

_D_MODEL, _HEADS, _LAYERS, _FFN = 512, 8, 6, 2048


def nn_transformer(batch_size: int, seq_len: int, dtype: torch.dtype, attn: str) -> ZooModel:
    """nn.Transformer: d_model 512, 8 heads, 6+6 layers, FFN 2048, nn.MultiheadAttention throughout.

    Inputs are embeddings: ``src`` and ``tgt`` of shape ``(B, seq_len, 512)``, a causal additive
    ``tgt_mask`` ``(seq_len, seq_len)`` and ``tgt_is_causal=True`` (without it PyTorch compares the
    mask with a causal one, a data-dependent branch that ``torch.export`` cannot trace). In eval mode
    with autograd off, PyTorch may route the encoder through its fused fast path; with autograd on
    (as under ``torch.export``) it takes the plain path.
    """
    model = torch_module(
        lambda: nn.Transformer(_D_MODEL, _HEADS, _LAYERS, _LAYERS, _FFN, batch_first=True),
        dtype,
    )
    src = torch.randn(batch_size, seq_len, _D_MODEL)
    tgt = torch.randn(batch_size, seq_len, _D_MODEL)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(seq_len)
    notes = "torch.nn.Transformer (batch_first); nn.MultiheadAttention, attn_implementation does not apply"
    kwargs = {"tgt_mask": tgt_mask, "tgt_is_causal": True}
    return ZooModel("nn-transformer", model, (src, tgt), kwargs, "torch.nn", "nn.transformer", notes)
