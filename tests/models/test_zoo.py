"""Every zoo model builds, runs its example inputs on CPU and honours batch_size, seq_len and dtype."""

import sys
import types

import pytest
import torch

from attnkit.errors import InvalidArgumentError
from attnkit.models import ZooModel, build_model, list_models

_SMALL = {"vit_b_16": None, "vit_l_16": None}  # images fix the sequence; the text models get 12 tokens
_VIT_DIMS = {"vit_b_16": (768, 12), "vit_l_16": (1024, 24)}  # hidden size, layers


def _run(zoo_model: ZooModel) -> torch.Tensor:
    with torch.no_grad():
        out = zoo_model.model(*zoo_model.example_inputs, **zoo_model.example_kwargs)
    return out if isinstance(out, torch.Tensor) else out[0]


# ViT-L shares its code path with ViT-B; test_vit_dimensions builds it without the 120 GFLOP forward.
@pytest.mark.parametrize("name", [name for name in list_models() if name != "vit_l_16"])
def test_builds_and_runs(name):
    zoo_model = build_model(name, batch_size=2, seq_len=_SMALL.get(name, 12))
    assert zoo_model.name == name and not zoo_model.model.training
    assert zoo_model.example_inputs[0].shape[0] == 2
    out = _run(zoo_model)
    assert out.shape[0] == 2 and (name in _SMALL or out.shape[1] == 12)
    assert torch.isfinite(out).all() and out.std() > 0


@pytest.mark.parametrize("name", list(_VIT_DIMS))
def test_vit_dimensions(name):
    zoo_model = build_model(name, device="meta")  # shapes only: no 1.2 GB of ViT-L weights
    hidden, layers = _VIT_DIMS[name]
    square = [p for p in zoo_model.model.parameters() if p.shape == (hidden, hidden)]
    # transformers: separate q, k, v, output projections; torchvision packs q, k, v into one (3h, h) weight
    assert len(square) == (4 if zoo_model.source == "transformers" else 1) * layers
    assert zoo_model.example_inputs[0].shape == (1, 3, 224, 224)
    assert zoo_model.source in zoo_model.notes


def test_dtype_and_attn_implementation():
    zoo_model = build_model("llama-gqa", seq_len=8, dtype=torch.bfloat16, attn_implementation="eager")
    assert {p.dtype for p in zoo_model.model.parameters()} == {torch.bfloat16}
    assert zoo_model.example_inputs[0].dtype == torch.long and "'eager'" in zoo_model.notes
    assert _run(zoo_model).dtype == torch.bfloat16
    nn_model = build_model("nn-transformer", seq_len=8, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in (*nn_model.example_inputs, nn_model.example_kwargs["tgt_mask"]))
    assert _run(nn_model).dtype == torch.float64


def test_deterministic_and_eager_matches_sdpa():
    first, second = (build_model("llama-gqa", seq_len=8) for _ in range(2))
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(_run(first), _run(second))
    eager = build_model("llama-gqa", seq_len=8, attn_implementation="eager")
    torch.testing.assert_close(_run(eager), _run(first), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        ({"name": "resnet"}, "name"),
        ({"name": "gpt2", "seq_len": 2048}, "seq_len"),
        ({"name": "vit_b_16", "seq_len": 64}, "seq_len"),
        ({"name": "gpt2", "batch_size": 0}, "batch_size"),
        ({"name": "gpt2", "dtype": torch.int32}, "dtype"),
        ({"name": "gpt2", "attn_implementation": "flash"}, "attn_implementation"),
        ({"name": "gpt2", "device": "gpu"}, "device"),
    ],
)
def test_bad_arguments(kwargs, parameter):
    with pytest.raises(InvalidArgumentError) as info:
        build_model(**kwargs)
    assert info.value.parameter == parameter


def test_unknown_name_lists_models():
    with pytest.raises(InvalidArgumentError, match="nn-transformer"):
        build_model("vit_h_14")


def test_vit_prefers_torchvision(monkeypatch):
    """Where torchvision imports, the ViTs come from it (faked here: torchvision does not import on our CPUs)."""
    models = types.ModuleType("torchvision.models")
    models.vit_b_16 = lambda weights: torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 16, stride=16), torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 1000)
    )
    torchvision = types.ModuleType("torchvision")
    torchvision.models, torchvision.__version__ = models, "0.0-fake"
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    zoo_model = build_model("vit_b_16", batch_size=2)
    assert zoo_model.source == "torchvision" and "vit_b_16(weights=None)" in zoo_model.notes
    assert _run(zoo_model).shape == (2, 1000)
