"""Recommendations cite the numbers measured; layers written as matmul + softmax are found by graph capture."""

import torch
from torch import nn

from attnkit.validate import find_layers
from attnkit.validate.accuracy import AccuracyResult
from attnkit.validate.compatibility import LayerSupport
from attnkit.validate.performance import PerfResult
from attnkit.validate.recommend import recommend
from attnkit.validate.sites import AttentionLayer


def _perf(backend, ms, case="B8 H12 S1024x1024 D64 bfloat16"):
    return PerfResult("layer", backend, case, "enc.0.attn", 8, 1024, "ok", median_ms=ms, clock="cuda-events")


def test_speed_advice_names_the_backend_and_the_measured_speedup():
    layer = AttentionLayer(["enc.0.attn", "enc.1.attn"], "nn.MultiheadAttention", {}, ["need_weights=True (the default): pass need_weights=False"])
    accuracy = [AccuracyResult("cudnn", "case", [], None, "pass"), AccuracyResult("flex", "case", [], None, "fail", "dk error 1 > 2 x math 0.01")]
    perf = [_perf("default", 1.7), _perf("math", 1.7), _perf("cudnn", 1.0), _perf("flex", 0.5)]
    recs = recommend([LayerSupport(layer, {"cudnn": None})], accuracy, perf, [], [])
    texts = [r.text for r in recs]
    assert recs[0].kind == "fix" and "'flex'" in texts[0]  # the fastest one is wrong: never recommended
    assert any("2 layer(s)" in t and "need_weights=False" in t and "cudnn is 1.7x faster" in t for t in texts), texts
    assert any("'cudnn' passed accuracy and is the fastest at 1 of 1 timed shapes, 1.70-1.70x faster" in t for t in texts), texts
    assert not any("'flex' is" in t for t in texts)


def test_no_speed_advice_from_cpu_timings():
    perf = [PerfResult("layer", name, "c", "l", 1, 16, "ok", median_ms=ms, clock="cpu-wall") for name, ms in (("default", 9.0), ("flash", 1.0))]
    recs = recommend([], [AccuracyResult("flash", "c", [], None, "pass")], perf, [], [])
    assert [r.kind for r in recs] == ["info"] and "CPU" in recs[0].text


class _Eager(nn.Module):
    """Attention written out by hand (like HF attn_implementation="eager")."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)

    def forward(self, x):  # (B, S, 32)
        q, k, v = (t.unflatten(-1, (4, 8)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        probs = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1)
        return (probs @ v).transpose(1, 2).flatten(2)


def test_hand_written_attention_is_found_by_graph_capture():
    layers = find_layers(_Eager().eval(), (torch.randn(2, 10, 32),))
    assert len(layers) == 1 and layers[0].kind == "graph" and "matmul + softmax" in layers[0].blockers[0]
    spec = layers[0].attention_spec
    assert (spec.heads_q, spec.seq_q, spec.head_dim) == (4, 10, 8) and layers[0].scale is None
