"""SiteRecord: the one attention-site record that a graph site and a runtime call both yield."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnkit.discover import SiteRecord, capture, find_attention, intercept_attention
from attnkit.ops import attention_spec


class _Gqa(nn.Module):
    """Cross attention, 4 query heads over 2 KV heads, D=8, Dv=6, an explicit scale."""

    def __init__(self):
        super().__init__()
        self.q, self.kv, self.out = nn.Linear(32, 32), nn.Linear(24, 2 * 8 + 2 * 6), nn.Linear(24, 32)

    def forward(self, x, memory):
        batch, seq_q, seq_kv = x.shape[0], x.shape[1], memory.shape[1]
        q = self.q(x).view(batch, seq_q, 4, 8).transpose(1, 2)  # (B, 4, Sq, 8)
        k, v = self.kv(memory).split([16, 12], dim=-1)
        k = k.view(batch, seq_kv, 2, 8).transpose(1, 2)  # (B, 2, Skv, 8)
        v = v.view(batch, seq_kv, 2, 6).transpose(1, 2)  # (B, 2, Skv, 6)
        out = F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True)  # (B, 4, Sq, 6)
        return self.out(out.transpose(1, 2).reshape(batch, seq_q, 24))


def test_graph_site_and_runtime_call_give_one_record():
    torch.manual_seed(0)
    model, x, memory = _Gqa().eval(), torch.randn(3, 5, 32), torch.randn(3, 7, 24)
    (graph,) = [site.record for site in find_attention(capture(model, (x, memory)))]
    calls = []
    with torch.no_grad(), intercept_attention(lambda call, original: calls.append(call) or original()):
        model(x, memory)
    runtime = calls[0].site(graph.path)

    shared = ("path", "num_heads", "num_kv_heads", "head_dim_qk", "head_dim_v", "batch", "seq_q", "seq_kv",
              "mask", "causal", "dropout_p")
    assert [getattr(graph, f) for f in shared] == [getattr(runtime, f) for f in shared] == ["", 4, 2, 8, 6, 3, 5, 7, "none", False, 0.0]
    assert graph.scale == pytest.approx(0.3) and runtime.scale == pytest.approx(0.3)
    assert graph.explicit_scale == pytest.approx(0.3) and runtime.explicit_scale == pytest.approx(0.3)
    # The graph knows more than the call: the kind and the projections; the call says "unknown".
    assert (graph.kind, graph.qkv_layout, runtime.kind, runtime.qkv_layout) == ("cross", "kv-packed", "unknown", "unknown")
    assert dict(graph.projections)["q"] is not None and runtime.projections == ()
    # Both give the spec the op itself derives from the tensors.
    call = calls[0]
    expected = attention_spec(call.q, call.k, call.v, mask=call.mask, causal=call.causal, scale=call.scale)
    assert graph.spec(device="cpu", dtype=torch.float32) == runtime.spec(device="cpu", dtype=torch.float32) == expected


def _record(**fields) -> SiteRecord:
    base = dict(path="a", kind="self", num_heads=4, num_kv_heads=4, head_dim_qk=16, head_dim_v=16, batch=2, seq_q=9,
                seq_kv=9, mask="none", causal=False, scale=None, dropout_p=0.0)
    return SiteRecord(**{**base, **fields})


@pytest.mark.parametrize("mask, causal, spec_mask", [("causal", True, "none"), ("padding", False, "bool"),
                                                     ("additive", False, "additive"), ("bool", True, "bool")])
def test_spec_maps_graph_mask_kinds(mask, causal, spec_mask):
    spec = _record(mask=mask, causal=causal).spec(device="cpu", dtype=torch.float16)
    assert (spec.mask, spec.causal, spec.dtype, spec.heads_kv) == (spec_mask, causal, torch.float16, 4)


def test_explicit_scale_and_describe():
    assert _record(scale=1 / math.sqrt(16)).explicit_scale is None and _record().explicit_scale is None
    assert _record(scale=1.0).explicit_scale == 1.0  # T5: unscaled scores group apart from the default
    assert _record(mask="bool", num_kv_heads=2).describe(torch.bfloat16) == "B=2 Hq=4 Hkv=2 Sq=9 Skv=9 D=16 bfloat16 mask=bool causal=False"
    assert _record().describe() == "B=2 Hq=4 Hkv=4 Sq=9 Skv=9 D=16 mask=none causal=False"


class _TorchLayers(nn.Module):
    """Causal self-attention in an nn.TransformerEncoder (batch first, 4 heads) and an nn.MultiheadAttention
    cross attention laid out (S, B, E) with its own key and value widths (8 heads)."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.cross = nn.MultiheadAttention(64, 8, kdim=32, vdim=48)

    def forward(self, x, keys, values):
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        h = self.encoder(x, mask=causal, is_causal=True)
        return self.cross(h.transpose(0, 1), keys, values, need_weights=False)[0]


def _module_sites(model, inputs, module_type) -> dict[str, SiteRecord]:
    """What a forward pre-hook on every ``module_type`` sees, as validate's and optimize's probes record it."""
    sites = {}

    def probe(path):
        def hook(module, args, kwargs):
            sites[path] = SiteRecord.of_module_call(path, module, args, kwargs)

        return hook

    hooks = [module.register_forward_pre_hook(probe(path), with_kwargs=True)
             for path, module in model.named_modules() if isinstance(module, module_type)]  # fmt: skip
    with torch.no_grad():
        model(*inputs)
    for hook in hooks:
        hook.remove()
    return sites


def test_analyze_validate_and_optimize_describe_multihead_attention_alike():
    """One site per nn.MultiheadAttention, whichever command finds it: analyze's graph pattern, validate's
    hook on the torch module, and optimize's hook on the attnkit layer its rewrite put there."""
    import copy

    from attnkit.nn import MultiHeadAttention
    from attnkit.optimize.config import OptimizeConfig
    from attnkit.optimize.rewrite import rewrite_modules

    torch.manual_seed(0)
    model = _TorchLayers().train()  # train mode with dropout 0: torch's fused inference path would skip the hooks
    inputs = (torch.randn(3, 10, 64), torch.randn(7, 3, 32), torch.randn(7, 3, 48))
    analyze = {site.record.path: site.record for site in find_attention(capture(model.eval(), inputs))}
    validate = _module_sites(model.train(), inputs, nn.MultiheadAttention)
    rewritten, rewrites, _ = rewrite_modules(copy.deepcopy(model), OptimizeConfig())
    assert sorted(r.path for r in rewrites) == sorted(validate)
    optimize = _module_sites(rewritten, inputs, MultiHeadAttention)

    paths = ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn", "cross"]
    assert sorted(analyze) == sorted(validate) == sorted(optimize) == sorted(paths)
    shared = ("path", "kind", "num_heads", "num_kv_heads", "head_dim_qk", "head_dim_v", "batch", "seq_q", "seq_kv", "explicit_scale")
    for path in paths:
        expected = [getattr(analyze[path], f) for f in shared]
        assert [getattr(validate[path], f) for f in shared] == [getattr(optimize[path], f) for f in shared] == expected, path
        spec = analyze[path].spec(device="cpu", dtype=torch.float32)  # mask kind and causality as the op sees them
        assert validate[path].spec(device="cpu", dtype=torch.float32) == optimize[path].spec(device="cpu", dtype=torch.float32) == spec
    assert [analyze[p].kind for p in paths] == ["self", "self", "cross"] and analyze["cross"].num_heads == 8
    assert analyze[paths[0]].causal and optimize[paths[0]].causal and optimize[paths[0]].mask == "none"
    assert validate[paths[0]].qkv_layout == optimize[paths[0]].qkv_layout == analyze[paths[0]].qkv_layout == "packed"
