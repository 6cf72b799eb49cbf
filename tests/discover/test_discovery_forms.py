"""find_attention() on attention spelled the ways real models spell it: Gemma 2's soft-capped logits,
BLOOM's ALiBi ``baddbmm`` with a head view before the softmax, Falcon's fused ``x @ W.T`` Q/K/V split by
views and slices with K/V broadcast to the query heads before RoPE, ``torch.einsum``, Swin v2's cosine
attention with a learned per-head scale, SpeechT5's bias added in place; and what is not attention."""

import math
import sys

import pytest
import torch

from attnkit.discover.attention import find_attention
from attnkit.discover.capture import capture

_B, _S, _H, _D = 2, 6, 4, 8
_WIDTH = _H * _D


class _Heads(torch.nn.Module):
    """Packed Q/K/V projection split into (B, H, S, D) heads, and the output projection."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(_WIDTH, 3 * _WIDTH), torch.nn.Linear(_WIDTH, _WIDTH)

    def split(self, x):  # x: (B, S, W) -> 3 x (B, H, S, D)
        return self.qkv(x).view(_B, _S, 3, _H, _D).permute(2, 0, 3, 1, 4).unbind(0)

    def merge(self, o):  # o: (B, H, S, D) -> (B, S, W)
        return self.out(o.transpose(1, 2).reshape(_B, _S, _WIDTH))


class _SoftCapped(_Heads):
    """Gemma 2 eager attention: scores * scaling / cap -> tanh -> * cap -> + causal mask -> softmax."""

    cap, scaling = 50.0, 0.3

    def forward(self, x):
        q, k, v = self.split(x)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        scores = torch.tanh(scores / self.cap) * self.cap
        mask = torch.full((_S, _S), torch.finfo(x.dtype).min, device=x.device).triu(1)
        probs = torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.merge(torch.matmul(probs, v))


class _Alibi(_Heads):
    """BLOOM: (B*H, S, D) heads, ALiBi bias through ``baddbmm(beta=1, alpha=1/sqrt(D))``, a (B, H, S, S) view,
    a causal ``masked_fill``, softmax in fp32, a view back to (B*H, S, S) and ``bmm`` with V."""

    def forward(self, x, alibi):  # alibi: (B*H, 1, S)
        q, k, v = (t.reshape(_B * _H, _S, _D) for t in self.split(x))
        scores = alibi.baddbmm(batch1=q, batch2=k.transpose(-1, -2), beta=1.0, alpha=1 / math.sqrt(_D))
        scores = scores.view(_B, _H, _S, _S)
        future = torch.ones(_S, _S, dtype=torch.bool, device=x.device).triu(1)
        probs = torch.softmax(scores.masked_fill(future, torch.finfo(x.dtype).min), dim=-1, dtype=torch.float32)
        out = torch.bmm(probs.to(q.dtype).view(_B * _H, _S, _S), v)
        return self.merge(out.view(_B, _H, _S, _D))


class _Einsum(_Heads):
    def forward(self, x):
        q, k, v = self.split(x)
        probs = (torch.einsum("bhqd,bhkd->bhqk", q, k) * _D**-0.5).softmax(-1)
        return self.merge(torch.einsum("bhqk,bhkd->bhqd", probs, v))


class _Cosine(_Heads):
    """Swin v2's cosine attention: normalized Q and K, scores times a learned per-head ``exp(logit_scale)``,
    plus a per-head position bias."""

    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.log(10 * torch.ones(_H, 1, 1)))
        self.bias = torch.nn.Parameter(torch.randn(_H, _S, _S))

    def forward(self, x):
        q, k, v = self.split(x)
        scores = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-2, -1)
        scores = scores * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        return self.merge((scores + self.bias).softmax(-1) @ v)


class _InPlaceBias(torch.nn.Module):
    """SpeechT5's encoder: separate projections, (B*H, S, D) heads, a relative-position bias from another GEMM
    added in place."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = (torch.nn.Linear(_WIDTH, _WIDTH) for _ in range(4))
        self.positions = torch.nn.Parameter(torch.randn(_S, _S, _D))

    def forward(self, x):
        q, k, v = (p(x).view(_B, _S, _H, _D).transpose(1, 2).reshape(_B * _H, _S, _D) for p in (self.q, self.k, self.v))
        scores = torch.bmm(q, k.transpose(1, 2))
        scores += torch.matmul(q.transpose(0, 1), self.positions.transpose(-2, -1)).transpose(0, 1)
        out = torch.bmm(scores.softmax(-1), v).view(_B, _H, _S, _D)
        return self.out(out.transpose(1, 2).reshape(_B, _S, _WIDTH))


class _PackedMerged(_Heads):
    """A packed Q/K/V split by views, heads merged into the batch, ``bmm`` with no (B, H, S, S) view of the scores."""

    def forward(self, x):
        q, k, v = (t.reshape(_B * _H, _S, _D) for t in self.split(x))
        return self.merge(torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v).view(_B, _H, _S, _D))


class _ScoresTimesScores(_Heads):
    """Scores multiplied by a tensor of their own shape: not a learned scale (and not attention this finds)."""

    def forward(self, x):
        q, k, v = self.split(x)
        scores = q @ k.transpose(-2, -1)
        return self.merge((scores * torch.sigmoid(scores.detach())).softmax(-1) @ v)


class _NotAttention(torch.nn.Module):
    """A softmax between two einsums that are not (rows, inner) x (inner, cols) products: a mixture gate."""

    def forward(self, x, experts):  # x: (B, S, E), experts: (E, S, W)
        gate = torch.einsum("bse,ese->bse", x, experts[..., :1].expand(-1, -1, x.shape[-1]).transpose(0, 2)).softmax(-1)
        return torch.einsum("bse,esw->bsw", gate, experts)


def _one_site(model, *inputs):
    (site,) = find_attention(capture(model, inputs))
    return site


def test_soft_capped_attention_is_found_with_its_cap_and_scale():
    site = _one_site(_SoftCapped(), torch.randn(_B, _S, _WIDTH))
    assert (site.form, site.kind, site.causal, site.mask, site.qkv_layout) == ("matmul-softmax", "self", True, "causal", "packed")
    assert site.softcap == pytest.approx(50.0) and site.scale == pytest.approx(0.3)
    assert (site.batch, site.num_heads, site.seq_q, site.head_dim_qk) == (_B, _H, _S, _D)
    assert all(site.projections[key] is not None for key in ("q", "k", "v", "out"))


def test_alibi_baddbmm_with_head_view_is_found():
    alibi = torch.randn(_B * _H, 1, _S)
    site = _one_site(_Alibi(), torch.randn(_B, _S, _WIDTH), alibi)
    assert (site.form, site.kind, site.causal, site.qkv_layout) == ("matmul-softmax", "self", True, "packed")
    assert site.mask == "additive"  # an ALiBi bias, though added from a model input: it changes scores, it does not only hide keys
    assert (site.batch, site.num_heads, site.num_kv_heads, site.seq_kv, site.head_dim_v) == (_B, _H, _H, _S, _D)
    assert site.scale == pytest.approx(_D**-0.5) and site.softcap == 0.0
    assert site.projections["out"] is not None


def test_einsum_attention_is_found_and_other_einsums_are_not():
    site = _one_site(_Einsum(), torch.randn(_B, _S, _WIDTH))
    assert (site.form, site.causal, site.mask, site.qkv_layout) == ("matmul-softmax", False, "none", "packed")
    assert (site.batch, site.num_heads, site.seq_q, site.seq_kv, site.head_dim_qk) == (_B, _H, _S, _S, _D)
    assert site.scale == pytest.approx(_D**-0.5)
    assert find_attention(capture(_NotAttention(), (torch.randn(2, 5, 3), torch.randn(3, 5, 7)))) == []


def test_tanh_without_a_cap_is_no_soft_cap():
    class _Tanh(_Heads):  # tanh on the scores with no cap around it: cap 1
        def forward(self, x):
            q, k, v = self.split(x)
            return self.merge(torch.matmul(torch.tanh(torch.matmul(q, k.transpose(2, 3))).softmax(-1), v))

    site = _one_site(_Tanh(), torch.randn(_B, _S, _WIDTH))
    assert site.softcap == 1.0 and site.scale == 1.0


def test_cosine_attention_with_a_learned_per_head_scale_is_found():
    site = _one_site(_Cosine(), torch.randn(_B, _S, _WIDTH))
    assert (site.form, site.kind, site.mask, site.qkv_layout) == ("matmul-softmax", "self", "additive", "packed")
    assert len(site.scale_nodes) == 1 and site.scale == 1.0 and "learned scale" in repr(site)
    assert all(site.projections[key] is not None for key in ("q", "k", "v", "out"))
    assert find_attention(capture(_ScoresTimesScores(), (torch.randn(_B, _S, _WIDTH),))) == []


def test_a_bias_added_in_place_is_a_mask():
    site = _one_site(_InPlaceBias(), torch.randn(_B, _S, _WIDTH))
    assert (site.form, site.kind, site.mask, site.qkv_layout) == ("matmul-softmax", "self", "additive", "separate")
    assert (site.batch, site.num_heads, site.seq_q, site.seq_kv) == (_B, _H, _S, _S) and len(site.mask_nodes) == 1


@pytest.mark.parametrize("batch", [2, 3])  # 3: B*H = 12 = 3H, which counting heads from the packed width got wrong silently
def test_heads_merged_into_the_batch_are_counted_from_the_split_before_the_merge(batch, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "_B", batch)  # the module's heads helpers read _B
    site = _one_site(_PackedMerged(), torch.randn(batch, _S, _WIDTH))
    assert (site.batch, site.num_heads, site.num_kv_heads, site.qkv_layout) == (batch, _H, _H, "packed")


def test_transformers_swinv2_window_attention():
    transformers = pytest.importorskip("transformers")
    config = transformers.Swinv2Config(image_size=32, patch_size=2, embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4)
    model = transformers.Swinv2Model(config).eval()
    sites = find_attention(capture(model, (torch.randn(1, 3, 32, 32),)))
    assert [(s.kind, s.batch, s.num_heads, s.seq_q, s.mask, s.qkv_layout) for s in sites] == [
        ("self", 16, 2, 16, "additive", "separate"), ("self", 4, 4, 16, "additive", "separate")]
    assert all(s.scale_nodes for s in sites)


def _tiny(config_cls, model_cls, attn="eager", **fields):
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, config_cls)(vocab_size=64, **fields)
    config._attn_implementation = attn
    return getattr(transformers, model_cls)(config).eval()


def test_transformers_gemma2_soft_capping():
    model = _tiny("Gemma2Config", "Gemma2Model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, attn_logit_softcapping=50.0,
                  query_pre_attn_scalar=8)
    sites = find_attention(capture(model, (), {"input_ids": torch.randint(0, 64, (2, 8))}))
    assert len(sites) == 2
    for site in sites:
        assert (site.causal, site.num_heads, site.num_kv_heads, site.softcap) == (True, 4, 2, 50.0)
        assert site.scale == pytest.approx(8**-0.5)


def test_masks_are_named_for_what_they_hide():
    """Padding hides whole keys; a sliding window (Starcoder2, every layer) hides keys from some queries
    only, and ALiBi (BLOOM) adds a bias: neither is called padding although both are built from ``attention_mask``."""
    ids = torch.randint(3, 64, (1, 16))
    window = _tiny("Starcoder2Config", "Starcoder2Model", attn="sdpa", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, sliding_window=4)  # fmt: skip
    alibi = _tiny("BloomConfig", "BloomModel", hidden_size=32, n_layer=2, n_head=4)
    padding = _tiny("BertConfig", "BertModel", attn="sdpa", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    for model, attention_mask, expected in ((window, torch.ones_like(ids), "bool"), (alibi, torch.ones_like(ids), "additive"), (padding, mask, "padding")):
        sites = find_attention(capture(model, (), {"input_ids": ids, "attention_mask": attention_mask}))
        assert [site.mask for site in sites] == [expected] * 2, type(model).__name__


def test_transformers_bloom_alibi():
    model = _tiny("BloomConfig", "BloomModel", hidden_size=32, n_layer=2, n_head=4)
    ids = torch.randint(0, 64, (2, 8))
    sites = find_attention(capture(model, (), {"input_ids": ids}))
    assert len(sites) == 2
    for site in sites:
        assert (site.form, site.causal, site.num_heads, site.head_dim_qk, site.seq_kv) == ("matmul-softmax", True, 4, 8, 8)
        assert site.qkv_layout == "packed" and site.scale == pytest.approx(8**-0.5)


@pytest.mark.parametrize(
    "attn, fields, kv_heads",
    [
        ("sdpa", dict(new_decoder_architecture=True, num_kv_heads=2), 2),  # view (B, S, kv, group + 2, D), slices
        ("eager", dict(new_decoder_architecture=True, num_kv_heads=2), 2),  # scores /= sqrt(D) in place
        ("sdpa", dict(multi_query=True), 1),
        ("sdpa", dict(multi_query=False), 4),  # classic: view (B, S, H, 3, D), select
    ],
)
def test_transformers_falcon_fused_qkv(attn, fields, kv_heads):
    """One ``x @ W.T`` makes Q, K and V (packed self attention); K/V heads are counted before their broadcast."""
    model = _tiny("FalconConfig", "FalconModel", attn, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  alibi=False, bias=False, **fields)
    sites = find_attention(capture(model, (), {"input_ids": torch.randint(0, 64, (2, 8))}))
    assert len(sites) == 2
    for site in sites:
        assert (site.kind, site.qkv_layout, site.causal, site.num_heads, site.num_kv_heads) == ("self", "packed", True, 4, kv_heads)
        assert site.projections["q"] == site.projections["k"] == site.projections["v"] and site.projections["out"]
        assert site.form == ("sdpa" if attn == "sdpa" else "matmul-softmax") and site.scale == pytest.approx(8**-0.5)
