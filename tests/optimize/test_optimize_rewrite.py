"""What `optimize` rewrites, what it leaves alone, state dicts, reports and argument errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from attnkit.errors import InvalidArgumentError, InvalidTypeError
from attnkit.nn import MultiHeadAttention
from attnkit.optimize import FusedProjection, OptimizeConfig, optimize
from optimize_models import build

FAST = OptimizeConfig(check=False, measure=False)


class MyAttention(nn.Module):
    """An attention the optimizer does not know: must be left alone and reported."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return torch.softmax(self.proj(x) @ x.transpose(1, 2), -1) @ x


def test_unknown_modules_are_untouched_and_listed():
    model = nn.Sequential(MyAttention(), nn.Linear(8, 8))
    x = torch.randn(2, 5, 8)
    optimized, report = optimize(model, (x,))
    assert report.rewrites == []
    assert [(s.path, s.module_class) for s in report.skipped] == [("0", "MyAttention")]
    assert type(optimized[0]) is MyAttention
    torch.testing.assert_close(optimized(x), model(x), rtol=0, atol=0)


def test_filter_and_original_left_unchanged():
    model, args, kwargs = build("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimized, report = optimize(model, args, example_kwargs=kwargs, config=FAST, module_filter_fn=lambda m, fqn: "layer.0." in fqn)
    assert [r.path for r in report.rewrites] == ["encoder.layer.0.attention.self"]
    assert [(s.path, s.reason) for s in report.skipped] == [("encoder.layer.1.attention.self", "module_filter_fn returned False")]
    assert [g.parent for g in report.fusion.groups] == ["encoder.layer.0.attention.self"]  # the filter sees fusion's parents too
    assert isinstance(optimized.encoder.layer[0].attention.self.key, FusedProjection)
    assert isinstance(optimized.encoder.layer[1].attention.self.key, nn.Linear)
    assert isinstance(model.encoder.layer[0].attention.self.key, nn.Linear)  # not inplace
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["bert", "llama", "t5", "gpt2", "torch-mha"])
def test_state_dict_keys_and_loading(name):
    model, args, kwargs = build(name)
    optimized, _ = optimize(model, args, example_kwargs=kwargs, config=FAST)
    original_state = model.state_dict()
    state = optimized.state_dict()
    assert state.keys() == original_state.keys()  # same keys; fused entries come back split
    assert all(torch.equal(state[k], original_state[k]) for k in state)
    # The original's checkpoint loads strictly into a freshly optimized copy of a different model.
    other, _, _ = build(name, seed=1)
    target, _ = optimize(other, args, example_kwargs=kwargs, config=FAST)
    target.load_state_dict(original_state)
    with torch.no_grad():
        expected = [t for t in _tensors(model(*args, **kwargs))]
        got = [t for t in _tensors(target(*args, **kwargs))]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _tensors(output):
    from attnkit.optimize.compare import float_tensors

    return float_tensors(output)


def test_rewritten_classes_and_gqa():
    model, args, kwargs = build("llama")
    optimized, report = optimize(model, args, example_kwargs=kwargs, config=OptimizeConfig(measure=False, check=False))
    attention = optimized.model.layers[0].self_attn
    assert isinstance(attention.q_proj, FusedProjection) and (attention.q_proj.out_features, attention.k_proj.out_features) == (32, 16)
    assert attention.fused_q_proj_k_proj_v_proj.weight.shape == (4 * 8 + 2 * 2 * 8, 32)  # GQA: 4 query heads, 2 KV heads
    assert all(b.backend for b in report.backends) and report.backends
    torch_model, targs, _ = build("torch-mha")
    optimized, _ = optimize(torch_model, targs, config=FAST)
    assert isinstance(optimized[0].self_attention, MultiHeadAttention)


def test_fuse_qkv_false_keeps_separate_projections():
    model, args, kwargs = build("bert")
    optimized, report = optimize(model, args, example_kwargs=kwargs, fuse_qkv=False, config=OptimizeConfig(measure=False))
    attention = optimized.encoder.layer[0].attention.self
    assert type(attention.query) is nn.Linear and report.fusion is None
    assert report.passed


def test_root_module_and_inplace():
    block = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    optimized, report = optimize(block, (x, x, x), config=OptimizeConfig(inplace=True, measure=False))
    assert isinstance(optimized, MultiHeadAttention) and report.passed


def test_report_json_and_render():
    model, args, kwargs = build("vit")
    _, report = optimize(model, args, example_kwargs=kwargs, dtype="bf16", config=OptimizeConfig(check_training=False))
    record = json.loads(report.dumps())
    assert record["passed"] is True and record["config"]["dtype"] == "bfloat16"
    assert {"rewrites", "skipped", "backends", "checks", "latency", "compiled", "notes"} <= set(record)
    from rich.console import Console

    console = Console(record=True, width=160)
    console.print(report)
    text = console.export_text()
    assert "ViTAttention on attnkit" in text and "Conv2d -> PatchifyGEMM" in text and "pass" in text
    assert "q_proj (32) + k_proj (32) + v_proj (32)" in text and record["fusion"]["groups"]
    assert "rewrites=3" in repr(report)  # two attentions and the patch embedding


@pytest.mark.parametrize(
    "kwargs,error,parameter",
    [
        (dict(dtype="int8"), InvalidArgumentError, "dtype"),
        (dict(backend="fastest"), InvalidArgumentError, "backend"),
        (dict(config={"dtype": "bf16"}), InvalidTypeError, "config"),
        (dict(example_kwargs=[1]), InvalidTypeError, "example_kwargs"),
        (dict(module_filter_fn="layer.0"), InvalidArgumentError, "module_filter_fn"),
    ],
)
def test_bad_arguments(kwargs, error, parameter):
    with pytest.raises(error) as info:
        optimize(nn.Linear(2, 2), **kwargs)
    assert info.value.parameter == parameter and "expected" in str(info.value)


def test_bad_model_and_inputs_and_config():
    with pytest.raises(InvalidTypeError, match="model: expected Module"):
        optimize("bert-base")
    with pytest.raises(InvalidTypeError, match="example_inputs"):
        optimize(nn.Linear(2, 2), {"x": 1})
    with pytest.raises(InvalidArgumentError, match="compile: expected \"none\", one of"):
        OptimizeConfig(compile="fast")
    with pytest.raises(InvalidArgumentError, match="name: expected one of"):
        OptimizeConfig.from_preset("turbo")
    assert OptimizeConfig.from_preset("fast").dtype == torch.bfloat16


def test_backend_report_names_torch_fused_path_where_the_layer_takes_it():
    """An attnkit layer that eval + no_grad sends to torch's fused kernel is reported as such; a GQA
    layer (never on that path) reports the ops backend auto picks."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.plain = MultiHeadAttention(32, 4, batch_first=True)
            self.grouped = MultiHeadAttention(32, 4, batch_first=True, num_kv_heads=2)

        def forward(self, x):
            return self.plain(x, x, x, need_weights=False)[0] + self.grouped(x, x, x, need_weights=False)[0]

    _, report = optimize(Two().eval(), (torch.randn(2, 8, 32),))
    uses = {use.path: use for use in report.backends}
    assert uses["plain"].backend == "torch fused MHA"
    assert uses["grouped"].backend != "torch fused MHA" and uses["grouped"].why.startswith("auto:")
