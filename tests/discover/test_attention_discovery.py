"""find_attention(): every attention in every zoo model, with its shape, mask and projections."""

import json

import pytest
import torch

from attnkit.discover.attention import AttentionSite, find_attention
from attnkit.discover.capture import capture

_SEQ = 16  # the shared captures' length (tests/conftest.py SEQ); short sequences keep export fast; the ViTs' 224x224 images fix 197 tokens


@pytest.fixture
def _zoo(captured_zoo):
    """(ZooModel, sites) at batch 2, seq 16, shared across the discovery and analysis tests."""

    def get(name: str, attn_implementation: str):
        zoo, _, sites = captured_zoo(name, attn_implementation)
        return zoo, sites

    return get


def _check_common(sites, batch=2):
    for site in sites:
        assert site.batch == batch
        assert all(site.projections[key] is not None for key in ("q", "k", "v", "out")), site
        assert site.core and site.dropout_p == 0.0
        assert site.scale == pytest.approx(site.head_dim_qk**-0.5, rel=1e-6) or site.scale == 1.0


@pytest.mark.parametrize(
    "name, heads, layers",
    [("vit_b_16", 12, 12), pytest.param("vit_l_16", 16, 24, marks=pytest.mark.slow)],
)
def test_vit(name, heads, layers, _zoo):
    zoo, sites = _zoo(name, "sdpa")
    assert len(sites) == layers
    layout = "packed" if zoo.source == "torchvision" else "separate"
    for site in sites:
        assert (site.kind, site.causal, site.mask, site.qkv_layout) == ("self", False, "none", layout)
        assert (site.num_heads, site.num_kv_heads, site.head_dim_qk, site.seq_q, site.seq_kv) == (heads, heads, 64, 197, 197)
    _check_common(sites)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert(attn, _zoo):
    _, sites = _zoo("bert-base", attn)
    assert len(sites) == 12
    assert {site.form for site in sites} == {"sdpa" if attn == "sdpa" else "matmul-softmax"}
    for site in sites:
        assert (site.kind, site.causal, site.mask, site.qkv_layout) == ("self", False, "padding", "separate")
        assert (site.num_heads, site.head_dim_qk, site.seq_q) == (12, 64, _SEQ)
        assert ".attention" in site.name
    _check_common(sites)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gpt2(attn, _zoo):
    _, sites = _zoo("gpt2", attn)
    assert len(sites) == 12
    for site in sites:
        assert (site.kind, site.causal, site.mask, site.qkv_layout) == ("self", True, "causal", "packed")
        assert site.projections["q"] == site.projections["k"] == site.projections["v"]
        assert (site.num_heads, site.head_dim_qk) == (12, 64)
    _check_common(sites)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_gqa(attn, _zoo):
    zoo, sites = _zoo("llama-gqa", attn)
    config = zoo.model.config
    assert len(sites) == config.num_hidden_layers
    for site in sites:
        assert (site.kind, site.causal, site.qkv_layout) == ("self", True, "separate")
        assert (site.num_heads, site.num_kv_heads) == (config.num_attention_heads, config.num_key_value_heads)
        assert site.num_kv_heads < site.num_heads
    _check_common(sites)


def test_t5_small(_zoo):
    _, sites = _zoo("t5-small", "sdpa")
    encoder = [site for site in sites if site.name.startswith("encoder")]
    decoder_self = [site for site in sites if site.name.startswith("decoder") and site.kind == "self"]
    cross = [site for site in sites if site.kind == "cross"]
    assert (len(sites), len(encoder), len(decoder_self), len(cross)) == (18, 6, 6, 6)
    assert not any(site.causal for site in encoder + cross) and all(site.causal for site in decoder_self)
    assert {site.qkv_layout for site in cross} == {"separate-kv"}
    assert all(site.mask == "additive" for site in encoder)  # relative position bias
    _check_common(sites)


def test_nn_transformer(_zoo):
    _, sites = _zoo("nn-transformer", "sdpa")
    by_role = {}
    for site in sites:
        by_role.setdefault((site.name.split(".")[0], site.kind, site.causal), []).append(site)
    assert {role: len(group) for role, group in by_role.items()} == {
        ("encoder", "self", False): 6,
        ("decoder", "self", True): 6,
        ("decoder", "cross", False): 6,
    }
    assert {site.module_type for site in sites} == {"MultiheadAttention"}
    assert {site.qkv_layout for site in sites if site.kind == "self"} == {"packed"}
    assert {site.qkv_layout for site in sites if site.kind == "cross"} == {"kv-packed"}
    _check_common(sites)


def test_multihead_attention_with_weights_is_found_by_its_bmm_chain():
    """need_weights=True makes nn.MultiheadAttention spell attention out with (B*H, S, D) bmm's."""
    model = torch.nn.MultiheadAttention(32, 4)
    query, key, value = torch.randn(5, 3, 32), torch.randn(7, 3, 32), torch.randn(7, 3, 32)
    (site,) = find_attention(capture(model, (query, key, value)))
    assert (site.form, site.module_type, site.kind) == ("matmul-softmax", "MultiheadAttention", "cross")
    assert site.qkv_layout == "separate-kv"
    assert (site.batch, site.num_heads, site.head_dim_qk, site.seq_q, site.seq_kv) == (3, 4, 8, 5, 7)
    assert site.scale == pytest.approx(8**-0.5)


def test_site_repr_and_json(_zoo):
    _, sites = _zoo("gpt2", "sdpa")
    site = sites[0]
    assert isinstance(site, AttentionSite)
    assert repr(site).startswith("AttentionSite(transformer.h.0.attn: self, causal")
    record = json.loads(site.to_json())
    assert record["num_heads"] == 12 and record["projections"]["out"] == site.projections["out"]
    with pytest.raises(AttributeError):
        site.num_heads = 1


class _CpuFlashKernel(torch.nn.Module):
    """Calls the CPU flash kernel that SDPA dispatches to (what a post-dispatch graph holds)."""

    def forward(self, q, k, v):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True, scale=0.25)[0]


def test_sdpa_kernel_op_is_found():
    q, kv = torch.randn(1, 4, 6, 16), torch.randn(1, 4, 6, 16)
    (site,) = find_attention(capture(_CpuFlashKernel(), (q, kv, kv)))
    assert (site.form, site.causal, site.mask, site.scale, site.qkv_layout) == ("sdpa", True, "causal", 0.25, "unknown")
    assert site.projections == {"q": None, "k": None, "v": None, "out": None}


def test_causal_float_mask_input_is_recognised():
    """A user-built -inf triangle passed as attn_mask is read from its values, not its source."""
    model = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(5)
    (site,) = find_attention(capture(model, (x, x, x), {"attn_mask": mask, "need_weights": False}))
    assert (site.kind, site.causal, site.mask, site.qkv_layout) == ("self", True, "causal", "packed")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_causal_with_padding_is_both(attn):
    """A left-padded batch makes GPT-2's mask causal and padding; an all-ones one is only causal."""
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64))
    model.set_attn_implementation(attn)
    ids = torch.randint(0, 64, (2, 8))
    padded = torch.ones(2, 8, dtype=torch.long)
    padded[0, :3] = 0
    for attention_mask, kind in ((padded, "padding"), (torch.ones_like(padded), "causal")):
        kwargs = {"input_ids": ids, "attention_mask": attention_mask, "use_cache": False}
        (site,) = find_attention(capture(model, (), kwargs))
        assert (site.causal, site.mask) == (True, kind)


def test_model_on_the_meta_device_is_analysed_without_values():
    """No tensor values on ``meta``: masks are classified from the graph, and nothing mixes devices."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=1)
    model = transformers.BertModel(config).eval().to("meta")
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    mask = torch.ones(2, 8, dtype=torch.long, device="meta")
    (site,) = find_attention(capture(model, (), {"input_ids": ids, "attention_mask": mask}))
    assert (site.causal, site.mask, site.num_heads) == (False, "padding", 4)

