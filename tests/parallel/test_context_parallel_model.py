"""context_parallel(model): a tiny transformers Llama/Mistral (random weights, float64) with its sequence
sharded over 2 gloo ranks gives the unsharded model's logits, loss and parameter gradients.

Logits to 1e-10 (float64 end to end; the ring's merges keep the log-sum-exp in float64); loss and
gradients to 1e-6 relative, because transformers' loss casts the logits to float32 (so its sum
over a different split of the tokens rounds differently); the reference runs ``sdpa`` (``eager``
takes its softmax in float32). The
Mistral case uses a sliding window shorter than a shard, so the ring's window masks and skipped
blocks are exercised through the model; a padding mask must raise rather than be dropped.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from attnkit.errors import UnsupportedError
from attnkit.parallel import context_parallel, shard_lm_batch
from attnkit.parallel.layout import unshard
from parallel_harness import spawn

transformers = pytest.importorskip("transformers")

SEQ, VOCAB = 24, 61


def _model(kind: str, implementation: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(**common, attn_implementation=implementation)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.MistralConfig(**common, sliding_window=5, attn_implementation=implementation)
        model = transformers.MistralForCausalLM(config)
    return model.double()


def _batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, SEQ), generator=generator)
    labels = input_ids.clone()
    labels[0, 5:9] = -100  # ignored tokens: the global count must be used on every rank
    return input_ids, labels


def _reference(kind: str) -> dict[str, torch.Tensor]:
    model = _model(kind, "sdpa")  # eager runs its softmax in float32
    input_ids, labels = _batch()
    result = model(input_ids=input_ids, labels=labels, use_cache=False)
    result.loss.backward()
    return {"logits": result.logits.detach(), "loss": result.loss.detach(), **{n: p.grad for n, p in model.named_parameters()}}


def _sharded(rank: int, world_size: int, kind: str, layout: str) -> dict:
    model = _model(kind, "sdpa")
    input_ids, labels = _batch()
    with context_parallel(model, layout=layout):
        batch = shard_lm_batch(input_ids, labels, layout=layout)
        result = model(**batch)
        result.loss.backward()
        try:  # a padding mask cannot be sharded: it must raise, not be dropped
            mask = torch.ones_like(batch["input_ids"])
            mask[0, 0] = 0
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask, use_cache=False)
            padding = ""
        except UnsupportedError as error:
            padding = str(error)
    assert model.config._attn_implementation == "sdpa"  # restored on exit
    loss = result.loss.detach().clone()
    dist.all_reduce(loss)
    grads = {}
    for name, parameter in model.named_parameters():
        dist.all_reduce(parameter.grad)
        grads[name] = parameter.grad
    return {"logits": result.logits.detach(), "loss": loss, "padding": padding, **grads}


@pytest.mark.parametrize("kind, layout", [("llama", "zigzag"), ("llama", "contiguous"), ("mistral", "zigzag")])
def test_sharded_model_equals_unsharded(kind, layout):
    per_rank = spawn(_sharded, 2, kind, layout, timeout=120)
    ref = _reference(kind)
    logits = unshard([r["logits"] for r in per_rank], layout=layout, dim=1)
    torch.testing.assert_close(logits, ref["logits"], atol=1e-10, rtol=1e-10)
    for rank in per_rank:
        assert "padding masks are not supported" in rank["padding"]
        torch.testing.assert_close(rank["loss"], ref["loss"], atol=1e-8, rtol=1e-6)
        for name in ref:
            if name not in ("logits", "loss"):
                torch.testing.assert_close(rank[name], ref[name], atol=1e-8, rtol=1e-6, msg=name)


def test_sharding_the_wrong_way_is_caught():
    """Planted fault: a contiguous model run on zigzag shards must not match (the test can fail)."""
    per_rank = spawn(_sharded, 2, "llama", "zigzag", timeout=120)
    ref = _reference("llama")
    wrong = unshard([r["logits"] for r in per_rank], layout="contiguous", dim=1)
    assert (wrong - ref["logits"]).abs().max() > 1e-3


def _mha(rank: int, world_size: int) -> dict:
    from attnkit.nn import MultiHeadAttention
    from attnkit.parallel import shard_sequence

    torch.manual_seed(0)
    model = torch.nn.Sequential(MultiHeadAttention(16, 4, batch_first=True)).double()
    x = torch.randn(2, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    local = shard_sequence(x, dim=1).requires_grad_(True)
    with context_parallel(model):
        out, _ = model[0](local, local, local, need_weights=False, is_causal=True)
    out.sum().backward()
    assert model[0].config.backend == "auto"  # restored on exit
    grads = {}
    for name, parameter in model.named_parameters():
        dist.all_reduce(parameter.grad)
        grads[name] = parameter.grad
    return {"out": out.detach(), "dx": local.grad, **grads}


def test_attnkit_multihead_attention_runs_context_parallel():
    from attnkit.nn import MultiHeadAttention

    per_rank = spawn(_mha, 2, timeout=120)
    torch.manual_seed(0)
    model = torch.nn.Sequential(MultiHeadAttention(16, 4, batch_first=True)).double()
    x = torch.randn(2, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    causal = torch.ones(16, 16, dtype=torch.bool).triu(1)  # nn.MultiheadAttention's convention: True = masked
    out, _ = model[0](x, x, x, need_weights=False, attn_mask=causal)
    out.sum().backward()
    torch.testing.assert_close(unshard([r["out"] for r in per_rank], dim=1), out.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(unshard([r["dx"] for r in per_rank], dim=1), x.grad, atol=1e-10, rtol=1e-10)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(per_rank[0][name], parameter.grad, atol=1e-10, rtol=1e-10, msg=name)


def test_boundary_mistakes_raise_attnkit_errors():
    """Without an initialized process group, with a 1-D batch or a non-mesh ``mesh``: one-line attnkit errors."""
    from attnkit.errors import AttnkitError

    assert not dist.is_initialized()
    with pytest.raises(UnsupportedError, match="not initialized"):
        shard_lm_batch(torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(AttnkitError, match="input_ids"):
        shard_lm_batch(torch.zeros(8, dtype=torch.long))
    with pytest.raises(AttnkitError, match="mesh"):
        with context_parallel(torch.nn.Linear(2, 2), mesh="not a mesh"):
            pass
