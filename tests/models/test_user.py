"""User models named package.module:function."""

import textwrap

import pytest
import torch

from attnkit.errors import InvalidArgumentError, InvalidTypeError
from attnkit.models import ZooModel, build_model

_MODULE = '''
import torch
from attnkit.models import ZooModel

def pair():
    return torch.nn.Linear(4, 3), (torch.randn(2, 4),)

def sized(batch_size, seq_len):
    model = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(batch_size, seq_len, 8)
    return ZooModel("mine", model, (x, x, x), {"need_weights": False}, "user", "user", "self-attention")

def not_a_model():
    return 42
'''


@pytest.fixture(autouse=True)
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent(_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_pair_form():
    zoo_model = build_model("my_models:pair", dtype=torch.float64)
    assert zoo_model.name == "my_models:pair" and zoo_model.source == "user" and not zoo_model.model.training
    assert zoo_model.example_inputs[0].dtype == torch.float64
    assert zoo_model.model(*zoo_model.example_inputs).shape == (2, 3)


def test_zoo_model_form_gets_sizes():
    zoo_model = build_model("my_models:sized", batch_size=3, seq_len=5)
    assert isinstance(zoo_model, ZooModel) and zoo_model.name == "my_models:sized"
    out, _ = zoo_model.model(*zoo_model.example_inputs, **zoo_model.example_kwargs)
    assert out.shape == (3, 5, 8)


@pytest.mark.parametrize(
    "kwargs, error, parameter",
    [
        ({"name": "my_models:pair", "seq_len": 16}, InvalidArgumentError, "seq_len"),
        ({"name": "my_models:missing"}, InvalidArgumentError, "name"),
        ({"name": "no_such_module_xyz:f"}, InvalidArgumentError, "name"),
        ({"name": "my_models:"}, InvalidArgumentError, "name"),
        ({"name": "my_models:not_a_model"}, InvalidTypeError, "return value of my_models:not_a_model"),
    ],
)
def test_user_mistakes(kwargs, error, parameter):
    with pytest.raises(error) as info:
        build_model(**kwargs)
    assert info.value.parameter == parameter
