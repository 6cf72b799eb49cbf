"""Small models of every family `optimize` rewrites, with random inputs (a few seconds each on CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

_TEXT = dict(vocab_size=97)


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, _TEXT["vocab_size"], (batch, seq))


def _right_padding(batch: int, seq: int) -> torch.Tensor:
    """Sequence b loses its last b+1 tokens: every query still sees a key in causal models."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(batch):
        mask[b, seq - b - 1 :] = 0
    return mask


def bert(impl: str):
    config = transformers.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, max_position_embeddings=64, **_TEXT)
    model = transformers.BertModel(config, add_pooling_layer=False)
    return model, (_ids(2, 13),), {"attention_mask": _right_padding(2, 13)}


def bert_decoder(impl: str):
    """BERT as a decoder with cross attention (BertCrossAttention) and causal self attention."""
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, is_decoder=True, add_cross_attention=True, **_TEXT,
    )  # fmt: skip
    model = transformers.BertModel(config, add_pooling_layer=False)
    kwargs = {"encoder_hidden_states": torch.randn(2, 7, 32), "use_cache": False}
    return model, (_ids(2, 11),), kwargs


def vit(impl: str):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4)
    return transformers.ViTModel(config, add_pooling_layer=False), (torch.randn(2, 3, 16, 16),), {}


def gpt2(impl: str):
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, **_TEXT)
    return transformers.GPT2LMHeadModel(config), (_ids(2, 13),), {"attention_mask": _right_padding(2, 13), "use_cache": False}


def llama(impl: str):
    """GQA (4 query heads over 2 KV heads) with rotary embeddings."""
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, bos_token_id=0, eos_token_id=0, pad_token_id=0, **_TEXT,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config), (_ids(2, 13),), {"attention_mask": _right_padding(2, 13), "use_cache": False}


def t5(impl: str):
    """Encoder self attention with relative bias, decoder causal self attention and cross attention."""
    config = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0, **_TEXT)
    kwargs = {"attention_mask": _right_padding(2, 13), "decoder_input_ids": _ids(2, 9), "use_cache": False}
    return transformers.T5Model(config), (_ids(2, 13),), kwargs


class TorchBlock(nn.Module):
    """A pre-norm block on nn.MultiheadAttention, called like torchvision's ViT EncoderBlock."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=0.1, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        return x + y + self.mlp(x + y)


def torch_mha(impl: str):
    return nn.Sequential(TorchBlock(), TorchBlock()), (torch.randn(2, 9, 32),), {}


BUILDERS = {"bert": bert, "bert-decoder": bert_decoder, "vit": vit, "gpt2": gpt2, "llama": llama, "t5": t5, "torch-mha": torch_mha}
REWRITES = {"bert": 2, "bert-decoder": 2, "vit": 3, "gpt2": 2, "llama": 2, "t5": 6, "torch-mha": 2}


def build(name: str, impl: str = "sdpa", seed: int = 0):
    """``(model, args, kwargs)`` with a fixed seed; transformers models use ``impl`` attention."""
    torch.manual_seed(seed)
    model, args, kwargs = BUILDERS[name](impl)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    return model.eval(), args, kwargs
