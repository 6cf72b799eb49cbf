"""capture(): export in eval mode, runnable graph, readable errors."""

import pytest
import torch

from attnkit.errors import CaptureError, InvalidTypeError
from attnkit.discover.capture import CapturedGraph, capture


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(32, 4, dropout=0.5, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class _BranchOnValue(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class _ReturnsCache(torch.nn.Module):
    class DynamicCache:
        pass

    def forward(self, x):
        return x, self.DynamicCache()


@torch.library.custom_op("attnkit_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


class _CustomOpWithoutFake(torch.nn.Module):
    def forward(self, x):
        return _twice(x) + 1


def test_capture_runs_and_matches_eager():
    model = _Block().train()
    x = torch.randn(2, 7, 32)
    captured = capture(model, x)
    assert isinstance(captured, CapturedGraph)
    assert model.training, "capture must restore the training flag"
    assert captured.num_nodes == len(captured.graph_module.graph.nodes) > 0
    assert captured.dtype == torch.float32 and captured.seconds > 0
    fresh = torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(captured.graph_module(fresh), model.eval()(fresh))
    assert "nodes=" in repr(captured)


def test_capture_dtype_casts_a_copy():
    model = _Block()
    captured = capture(model, (torch.randn(1, 5, 32),), dtype=torch.bfloat16)
    assert captured.dtype == torch.bfloat16
    assert captured.example_inputs[0].dtype == torch.bfloat16
    assert model.attn.in_proj_weight.dtype == torch.float32


@pytest.mark.parametrize(
    "model, construct, hint",
    [
        (_BranchOnValue(), "data-dependent guard", "control flow static"),
        (_ReturnsCache(), "DynamicCache", "use_cache=False"),
        (_CustomOpWithoutFake(), "attnkit_test::twice", "register_fake"),
    ],
)
def test_capture_error_names_construct_and_hint(model, construct, hint):
    with pytest.raises(CaptureError) as info:
        capture(model, (torch.randn(3),))
    message = str(info.value)
    assert construct in message and hint in message
    assert "Traceback" not in message


def _tiny_hf(name):
    """(model, kwargs) of a tiny Hugging Face decoder or encoder-decoder with random weights."""
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(3, 64, (2, 6))
    tokens = dict(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    seq2seq = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                   encoder_ffn_dim=64, decoder_ffn_dim=64, decoder_start_token_id=1)
    configs = {
        "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, **tokens), {}),
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**decoder, **tokens), {}),
        "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig(**decoder, **tokens), {}),
        "t5": (transformers.T5ForConditionalGeneration,
               transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, **tokens),
               {"decoder_input_ids": ids[:, :4]}),
        "bart": (transformers.BartForConditionalGeneration,
                 transformers.BartConfig(**seq2seq, max_position_embeddings=32, **tokens), {"decoder_input_ids": ids[:, :4]}),
        "whisper": (transformers.WhisperForConditionalGeneration,
                    transformers.WhisperConfig(**seq2seq, num_mel_bins=8, max_source_positions=16, max_target_positions=32,
                                               **tokens), {"decoder_input_ids": ids[:, :4]}),
    }
    cls, config, kwargs = configs[name]
    first = {"input_features": torch.randn(2, 8, 32)} if name == "whisper" else {"input_ids": ids}
    return cls(config).eval(), {**first, **kwargs}


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral", "t5", "bart", "whisper"])
def test_transformers_decoders_capture_without_extra_kwargs(name):
    """Decoders return a KV cache unless told not to; capture says use_cache=False for them."""
    from attnkit.discover.attention import find_attention

    model, kwargs = _tiny_hf(name)
    captured = capture(model, (), kwargs)
    assert captured.example_kwargs["use_cache"] is False and "use_cache" not in kwargs
    sites = find_attention(captured)
    assert len(sites) == (6 if name in ("t5", "bart", "whisper") else 2)
    assert any(site.causal for site in sites)
    with torch.no_grad():  # the graph computes what the model does (its cache-free outputs)
        expected = model(**kwargs, use_cache=False).logits
        torch.testing.assert_close(captured.graph_module(**captured.example_kwargs).logits, expected)


def test_an_explicit_use_cache_is_kept():
    model, kwargs = _tiny_hf("gpt2")
    with pytest.raises(CaptureError, match="use_cache=False"):
        capture(model, (), {**kwargs, "use_cache": True})


def test_capture_rejects_non_module():
    with pytest.raises(InvalidTypeError, match="model"):
        capture(lambda x: x, (torch.randn(3),))
