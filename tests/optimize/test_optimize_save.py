"""Save an optimized model and reload it: original weight names, plain transformers loading,
the same rewrites replayed, outputs equal to the optimized model's."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from attnkit.errors import InvalidArgumentError
from attnkit.nn import MultiHeadAttention
from attnkit.optimize import FusedProjection, OptimizeConfig, load_optimized, optimize, save_optimized
from attnkit.optimize.compare import float_tensors
from attnkit.optimize.save import MANIFEST, WEIGHTS

transformers = pytest.importorskip("transformers")
FAST = OptimizeConfig(check=False, measure=False)


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=97, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval(), torch.randint(0, 97, (2, 11))


def _outputs(model, *args, **kwargs):
    with torch.no_grad():
        return float_tensors(model(*args, **kwargs))


def _assert_same(got, expected):
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same weights, same code: bitwise


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_transformers_model_round_trip(tmp_path, dtype):
    model, ids = _llama()
    optimized, report = optimize(model, (ids,), dtype=dtype, config=FAST)
    assert report.fusion.groups
    save_optimized(optimized, report, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved == set(model.state_dict()) - {"lm_head.weight"} or saved == set(model.state_dict())  # original names (lm_head may be tied)
    expected = _outputs(optimized, ids)
    # A plain transformers model loads the checkpoint: same outputs, no attnkit inside.
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    if dtype is None:
        torch.testing.assert_close(_outputs(plain, ids)[0], expected[0], rtol=1e-5, atol=1e-5)
    # load_optimized replays the rewrite: fused, on attnkit, in the saved dtype, bitwise the same.
    again = load_optimized(tmp_path)
    assert isinstance(again.model.layers[0].self_attn.q_proj, FusedProjection)
    assert again.config._attn_implementation == optimized.config._attn_implementation
    assert next(again.parameters()).dtype == next(optimized.parameters()).dtype
    _assert_same(_outputs(again, ids), expected)


class _Net(nn.Module):
    """Not a transformers model: nn.MultiheadAttention plus hand-written Q/K/V, a tied weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 16, bias=False)
        self.out = nn.Linear(16, 16)
        self.out.weight = nn.Parameter(self.k.weight.data[:16, :16].clone())

    def forward(self, x):
        h = self.embed(x)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        q, k, v = self.q(h), self.k(h), self.v(h)
        return self.out(torch.softmax(q[..., :16] @ k.transpose(1, 2) / 4, -1) @ v)


def test_other_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(2, 9, 16)
    optimized, report = optimize(model, (x,), config=FAST)
    assert [g.members for g in report.fusion.groups] == [("q", "k", "v")]
    save_optimized(optimized, report, tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["format"] == "safetensors" and manifest["rewrites"] == ["mha"]
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / WEIGHTS))) == set(model.state_dict())
    torch.manual_seed(1)
    fresh = _Net()  # other weights: all must come from the checkpoint
    again = load_optimized(tmp_path, fresh)
    assert isinstance(again.mha, MultiHeadAttention) and isinstance(again.k, FusedProjection)
    _assert_same(_outputs(again, x), _outputs(optimized, x))
    plain = _Net()
    plain.load_state_dict(load_file(str(tmp_path / WEIGHTS)))  # the original architecture loads it too
    torch.testing.assert_close(_outputs(plain.eval(), x)[0], _outputs(optimized, x)[0], rtol=1e-5, atol=1e-6)


def test_load_errors(tmp_path):
    with pytest.raises(InvalidArgumentError, match="directory"):
        load_optimized(tmp_path)
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(2, 9, 16)
    optimized, report = optimize(model, (x,), config=FAST)
    save_optimized(optimized, report, tmp_path)
    with pytest.raises(InvalidArgumentError, match="model"):
        load_optimized(tmp_path)  # not a transformers checkpoint: the architecture is needed
    with pytest.raises(InvalidArgumentError, match="Missing keys"):
        load_optimized(tmp_path, nn.Sequential(nn.Linear(16, 16)))


def tiny_llama(batch_size=1, seq_len=None):
    """The user-model form of MODEL for the CLI."""
    model, _ = _llama()
    return model, (torch.randint(0, 97, (batch_size, seq_len or 9)),)


def test_cli_save(tmp_path):
    out = tmp_path / "saved"
    result = CliRunner().invoke(
        __import__("attnkit.cli.main", fromlist=["app"]).app,
        ["optimize", "test_optimize_save:tiny_llama", "--device", "cpu", "--no-check", "--save", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert (out / MANIFEST).is_file() and (out / "config.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    model, _ = _llama()
    ids = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(_outputs(reloaded, ids)[0], _outputs(model, ids)[0], rtol=1e-5, atol=1e-5)
    bad = CliRunner().invoke(__import__("attnkit.cli.main", fromlist=["app"]).app, ["optimize", "test_optimize_save:tiny_llama", "--save", str(tmp_path / "no" / "such" / "dir")])
    assert bad.exit_code == 2 and "--save" in bad.output
