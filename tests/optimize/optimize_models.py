"""Small transformers and torch models with random weights and inputs (a second or so each on CPU, one thread)."""

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


def _tokens(**extra):
    """Special tokens inside the tiny vocabulary."""
    return dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, **_TEXT, **extra)


def _decoder_lm(config_cls, model_cls, **dims):
    def builder(impl: str):
        config = config_cls(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            max_position_embeddings=64, **dims, **_tokens(),
        )  # fmt: skip
        return model_cls(config), (_ids(2, 11),), {"attention_mask": _right_padding(2, 11)}

    return builder


def distilbert(impl: str):
    config = transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, pad_token_id=0, **_TEXT)
    return transformers.DistilBertModel(config), (_ids(2, 11),), {"attention_mask": _right_padding(2, 11)}


def roberta(impl: str):
    config = transformers.RobertaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, **_tokens()
    )
    return transformers.RobertaModel(config, add_pooling_layer=False), (_ids(2, 11) + 3,), {"attention_mask": _right_padding(2, 11)}


def bart(impl: str):
    config = transformers.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, decoder_start_token_id=2, forced_eos_token_id=None, **_tokens(),
    )  # fmt: skip
    kwargs = {"attention_mask": _right_padding(2, 11), "decoder_input_ids": _ids(2, 7)}
    return transformers.BartForConditionalGeneration(config), (_ids(2, 11),), kwargs


def whisper(impl: str):
    config = transformers.WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16, max_target_positions=64,
        decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None, **_tokens(),
    )  # fmt: skip
    kwargs = {"decoder_input_ids": _ids(2, 7)}
    return transformers.WhisperForConditionalGeneration(config), (torch.randn(2, 16, 32),), kwargs


def clip_text(impl: str):
    config = transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32, **_tokens()
    )
    return transformers.CLIPTextModel(config), (_ids(2, 11),), {"attention_mask": _right_padding(2, 11)}


def clip_vision(impl: str):
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    return transformers.CLIPVisionModel(config), (torch.randn(2, 3, 32, 32),), {}


def swin(impl: str):
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, drop_path_rate=0.1)
    return transformers.SwinModel(config), (torch.randn(2, 3, 32, 32),), {}


def gemma2(impl: str, softcap: float | None = 50.0):
    config = transformers.Gemma2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
        max_position_embeddings=64, sliding_window=4, attn_logit_softcapping=softcap, final_logit_softcapping=None, **_tokens(),
    )  # fmt: skip
    return transformers.Gemma2ForCausalLM(config), (_ids(2, 11),), {"attention_mask": _right_padding(2, 11)}


HF_BUILDERS = {
    "distilbert": distilbert,
    "roberta": roberta,
    "mistral": _decoder_lm(transformers.MistralConfig, transformers.MistralForCausalLM, sliding_window=6),
    "qwen2": _decoder_lm(transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "gemma": _decoder_lm(transformers.GemmaConfig, transformers.GemmaForCausalLM, head_dim=8),
    "gemma2-no-softcap": lambda impl: gemma2(impl, softcap=None),
    "gemma2": gemma2,
    "bart": bart,
    "whisper": whisper,
    "clip-text": clip_text,
    "clip-vision": clip_vision,
    "swin": swin,
}
"""Families without a rewrite before the attention interface (test_optimize_hf_models.py)."""
_EAGER_ONLY = ("gemma2", "gemma2-no-softcap")
"""transformers refuses SDPA for Gemma2 (soft-capping): these stay on eager."""

BUILDERS = {"bert": bert, "bert-decoder": bert_decoder, "vit": vit, "gpt2": gpt2, "llama": llama, "t5": t5, "torch-mha": torch_mha}
REWRITES = {"bert": 2, "bert-decoder": 2, "vit": 3, "gpt2": 2, "llama": 2, "t5": 6, "torch-mha": 2}


def build(name: str, impl: str = "sdpa", seed: int = 0):
    """``(model, args, kwargs)`` with a fixed seed; transformers models use ``impl`` attention."""
    torch.manual_seed(seed)
    model, args, kwargs = {**BUILDERS, **HF_BUILDERS}[name](impl)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager" if name in _EAGER_ONLY else impl)
    return model.eval(), args, kwargs
