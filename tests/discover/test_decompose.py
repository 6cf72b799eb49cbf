"""decompose_attention(): SDPA spelled out in primitive ops, numerically the same graph."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves, tree_map

from attnkit.discover.attention import SDPA_OPS, op_name
from attnkit.discover.capture import capture
from attnkit.discover.decompose import DecomposedGraph, decompose_attention

_TOLERANCE = 1e-5  # float32; the rewrite reorders only the softmax scaling, measured error is ~1e-6


def _fresh_like(value):
    """New random inputs of the same kind: token ids stay in range, 0/1 masks stay 0/1 (random padding)."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        return torch.randn_like(value)
    if value.dtype == torch.bool:
        return torch.rand(value.shape) < 0.5
    return torch.randint_like(value, 0, int(value.max()) + 1)


def _assert_equivalent(captured, decomposed: DecomposedGraph):
    torch.manual_seed(1)
    args, kwargs = tree_map(_fresh_like, (captured.example_inputs, captured.example_kwargs))
    with torch.no_grad():
        expected = tree_leaves(captured.graph_module(*args, **kwargs))
        got = tree_leaves(decomposed.graph_module(*args, **kwargs))
    pairs = [(e, g) for e, g in zip(expected, got, strict=True) if isinstance(e, torch.Tensor)]
    assert pairs
    error = max((e.double() - g.double()).abs().max().item() for e, g in pairs)
    assert error <= _TOLERANCE


@pytest.mark.parametrize(
    "name",
    ["vit_b_16", pytest.param("vit_l_16", marks=pytest.mark.slow), "bert-base", "gpt2", "llama-gqa", "t5-small", "nn-transformer"],
)
def test_zoo_model_decomposes_and_matches(name, captured_zoo):
    _, captured, sites = captured_zoo(name)
    decomposed = decompose_attention(captured)
    graph = decomposed.graph_module.graph
    assert not any(op_name(node) in SDPA_OPS for node in graph.nodes)
    assert len(decomposed.replaced) == len(sites)
    assert decomposed.nodes_before == captured.num_nodes < decomposed.nodes_after == len(graph.nodes)
    softmaxes = [node for node in graph.nodes if op_name(node) in ("softmax", "_safe_softmax")]
    assert len(softmaxes) == len(decomposed.replaced)
    _assert_equivalent(captured, decomposed)


def test_hand_written_attention_is_left_as_is():
    """nn.MultiheadAttention with need_weights=True already computes attention from primitive ops."""
    x = torch.randn(5, 2, 16)
    captured = capture(torch.nn.MultiheadAttention(16, 2), (x, x, x))
    decomposed = decompose_attention(captured)
    assert decomposed.replaced == {} and decomposed.nodes_after == decomposed.nodes_before
    _assert_equivalent(captured, decomposed)


class _Sdpa(torch.nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.options)


_MASKS = {
    "none": None,
    "bool": torch.rand(1, 1, 7, 11) < 0.7,
    "float": torch.randn(2, 1, 7, 11),
}


_VARIANTS = [({}, mask) for mask in _MASKS] + [
    ({"is_causal": True}, "none"),  # SDPA takes either is_causal or a mask
    ({"scale": 0.3}, "float"),
    ({"enable_gqa": True}, "none"),
    ({"enable_gqa": True}, "bool"),
]


@pytest.mark.parametrize("options, mask", _VARIANTS)
def test_sdpa_variants_match(options, mask):
    """Awkward sizes (Sq=7, Skv=11, D=13, Dv=5); GQA with 6 query and 2 KV heads."""
    kv_heads = 2 if options.get("enable_gqa") else 6
    inputs = (torch.randn(2, 6, 7, 13), torch.randn(2, kv_heads, 11, 13), torch.randn(2, kv_heads, 11, 5), _MASKS[mask])
    captured = capture(_Sdpa(**options), inputs)
    decomposed = decompose_attention(captured)
    assert len(decomposed.replaced) == 1
    (names,) = decomposed.replaced.values()
    nodes = {node.name: node for node in decomposed.graph_module.graph.nodes}
    assert all(isinstance(nodes[name].meta["val"], torch.Tensor) for name in names)
    _assert_equivalent(captured, decomposed)
    assert "nodes" in repr(decomposed)


class _CpuFlashKernel(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True, scale=0.25)[0]


def test_sdpa_kernel_op_is_decomposed():
    inputs = (torch.randn(1, 3, 9, 16), torch.randn(1, 3, 11, 16), torch.randn(1, 3, 11, 16))
    captured = capture(_CpuFlashKernel(), inputs)
    decomposed = decompose_attention(captured)
    assert len(decomposed.replaced) == 1
    _assert_equivalent(captured, decomposed)


def test_decomposed_output_keeps_the_kernels_layout():
    """torch 2.11's export views the transpose of SDPA's output, valid only for the kernels' (B, S, H, D)-major
    strides: the decomposed output must come back in that layout (a planted contiguous one must not pass)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx import Graph, GraphModule

    from attnkit.discover.decompose import _Emitter, _match_layout

    mode = FakeTensorMode()
    with mode:
        like = torch.empty(2, 8, 4, 16).transpose(1, 2)  # (B, H, S, D) with (B, S, H, D)-major strides
        x = torch.empty(2, 4, 8, 16)
    graph = Graph()
    source = graph.placeholder("x")
    source.meta["val"] = x
    emit = _Emitter(graph, graph.call_function(torch.ops.aten.clone.default, (source,)))
    out = emit(torch.ops.aten.mul.Tensor, source, 2.0)
    result = _match_layout(emit, out, like)
    viewed = graph.call_function(torch.ops.aten.view.default, (graph.call_function(torch.ops.aten.transpose.int, (result, 1, 2)), [2, 8, 64]))
    graph.output(viewed)
    value = torch.randn(2, 4, 8, 16)
    torch.testing.assert_close(GraphModule(torch.nn.Module(), graph)(value), (value * 2).transpose(1, 2).reshape(2, 8, 64))
    assert result is not out and result.meta["val"].stride() == like.stride()
    with pytest.raises(RuntimeError, match="view size is not compatible"):  # the layout the fix restores matters
        (value * 2).transpose(1, 2).view(2, 8, 64)
