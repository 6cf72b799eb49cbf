"""capture(): export in eval mode, runnable graph, readable errors."""

import pytest
import torch

from attnkit.errors import CaptureError, InvalidTypeError
from attnkit.graph.capture import CapturedGraph, capture


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


def test_transformers_kv_cache_output_gets_use_cache_hint():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    model = transformers.GPT2Model(config)
    ids = torch.randint(0, 64, (1, 6))
    with pytest.raises(CaptureError, match="use_cache=False"):
        capture(model, (ids,))
    assert capture(model, (ids,), {"use_cache": False}).num_nodes > 0


def test_capture_rejects_non_module():
    with pytest.raises(InvalidTypeError, match="model"):
        capture(lambda x: x, (torch.randn(3),))
