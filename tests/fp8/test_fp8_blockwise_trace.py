"""The blockwise FP8 GEMM is one opaque op with a shape-only fake: it traces without a graph break."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from attnkit.fp8.gemm import _blockwise_mm


def test_blockwise_op_traces_with_its_fake_shape():
    with FakeTensorMode():
        a = torch.empty(256, 512, dtype=torch.float8_e4m3fn)
        b_t = torch.empty(384, 512, dtype=torch.float8_e4m3fn).t()
        out = _blockwise_mm(a, b_t, torch.empty(256, 4).t().contiguous().t(), 1, torch.empty(4, 3).t(), 2, torch.bfloat16)
    assert out.shape == (256, 384) and out.dtype == torch.bfloat16


def test_blockwise_op_compiles_fullgraph():

    def fn(a, b):
        return _blockwise_mm(a, b.t(), torch.ones(a.shape[0], 4), 1, torch.ones(4, 3), 2, torch.bfloat16) * 2

    graph = torch._dynamo.export(fn)(torch.empty(256, 512, dtype=torch.float8_e4m3fn), torch.empty(384, 512, dtype=torch.float8_e4m3fn))
    targets = [str(node.target) for node in graph.graph_module.graph.nodes if node.op == "call_function"]
    assert any("fp8_blockwise_mm" in t for t in targets), targets
