"""Transformers language models of the zoo: BERT-base, GPT-2 small, a small Llama with GQA, T5-small.

Configs spell out the real dimensions; ``use_cache=False`` everywhere so outputs hold no KV cache
and ``torch.export`` sees plain tensors inside a ``ModelOutput``.
"""

from __future__ import annotations

import torch
import transformers

from attnkit.models._construct import transformers_model
from attnkit.models.base import ZooModel


def bert_base(batch_size: int, seq_len: int, dtype: torch.dtype, attn: str) -> ZooModel:
    """BertModel, bert-base-uncased dimensions: hidden 768, 12 layers, 12 heads, MLP 3072."""
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    )
    input_ids = torch.randint(config.vocab_size, (batch_size, seq_len))
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    return _zoo_model(transformers.BertModel, config, dtype, attn, "bert", (input_ids,), {"attention_mask": attention_mask})


def gpt2(batch_size: int, seq_len: int, dtype: torch.dtype, attn: str) -> ZooModel:
    """GPT2LMHeadModel, GPT-2 small: hidden 768, 12 layers, 12 heads, 1024 positions (causal)."""
    config = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024, use_cache=False)
    input_ids = torch.randint(config.vocab_size, (batch_size, seq_len))
    return _zoo_model(transformers.GPT2LMHeadModel, config, dtype, attn, "gpt2", (input_ids,), {})


def llama_gqa(batch_size: int, seq_len: int, dtype: torch.dtype, attn: str) -> ZooModel:
    """LlamaForCausalLM, small: hidden 512, 4 layers, 8 query heads sharing 2 KV heads (GQA 4:1), RoPE."""
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        use_cache=False,
    )
    input_ids = torch.randint(config.vocab_size, (batch_size, seq_len))
    return _zoo_model(transformers.LlamaForCausalLM, config, dtype, attn, "llama", (input_ids,), {})


def t5_small(batch_size: int, seq_len: int, dtype: torch.dtype, attn: str) -> ZooModel:
    """T5ForConditionalGeneration, t5-small dimensions: d_model 512, 6+6 layers, 8 heads, d_ff 2048.

    Encoder self-attention, causal decoder self-attention and decoder-to-encoder cross attention;
    the decoder input has ``seq_len`` tokens as well.
    """
    config = transformers.T5Config(
        vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8, use_cache=False
    )
    input_ids = torch.randint(config.vocab_size, (batch_size, seq_len))
    decoder_input_ids = torch.randint(config.vocab_size, (batch_size, seq_len))
    kwargs = {"decoder_input_ids": decoder_input_ids}
    return _zoo_model(transformers.T5ForConditionalGeneration, config, dtype, attn, "t5", (input_ids,), kwargs)


def _zoo_model(cls: type, config, dtype: torch.dtype, attn: str, family: str, inputs: tuple, kwargs: dict) -> ZooModel:
    return ZooModel(
        name=family,
        model=transformers_model(cls, config, dtype, attn),
        example_inputs=inputs,
        example_kwargs=kwargs,
        source="transformers",
        family=family,
        notes=f"transformers {transformers.__version__} {cls.__name__}, attn_implementation={attn!r}",
    )
