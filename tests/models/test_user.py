"""User models named package.module:function."""

import textwrap

import pytest
import torch

from attnkit.errors import AttnkitError, InvalidArgumentError, InvalidTypeError
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

def triple(batch_size, seq_len):
    model = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(batch_size, seq_len, 8)
    return model, [x, x, x], {"need_weights": False}

def lone_tensor():
    return torch.nn.Linear(4, 3), torch.randn(5, 4)

def bad_kwargs():
    return torch.nn.Linear(4, 3), (torch.randn(5, 4),), [1, 2]

def broken(seq_len):
    raise ValueError(f"no checkpoint for seq_len={seq_len}")

def reads_values(seq_len):
    x = torch.randn(1, seq_len, 4)
    if x.sum().item() == float("nan"):  # needs data: fails under torch.device("meta")
        pass
    return torch.nn.Linear(4, 3), (x,)
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


def test_triple_form_with_list_args_and_kwargs():
    zoo_model = build_model("my_models:triple", batch_size=2, seq_len=5)
    assert len(zoo_model.example_inputs) == 3 and zoo_model.example_kwargs == {"need_weights": False}
    out, weights = zoo_model.model(*zoo_model.example_inputs, **zoo_model.example_kwargs)
    assert out.shape == (2, 5, 8) and weights is None


def test_lone_tensor_args_are_one_input():
    zoo_model = build_model("my_models:lone_tensor")
    assert isinstance(zoo_model.example_inputs, tuple) and len(zoo_model.example_inputs) == 1
    assert zoo_model.model(*zoo_model.example_inputs).shape == (5, 3)


def test_kwargs_that_are_not_a_dict_are_a_type_error():
    with pytest.raises(InvalidTypeError, match="kwargs dict"):
        build_model("my_models:bad_kwargs")


def test_a_builder_that_raises_is_named_with_its_error():
    with pytest.raises(AttnkitError) as info:
        build_model("my_models:broken", seq_len=7)
    message = str(info.value)
    assert "my_models:broken" in message and "ValueError: no checkpoint for seq_len=7" in message
    assert "my_models.py:" in message and "Traceback" not in message


@pytest.mark.parametrize("name", ["my_models:triple", "my_models:reads_values"])
def test_meta_builds_hold_no_data(name):
    """Under device="meta" the builder runs under torch.device("meta"); one that needs values runs normally, then moves."""
    zoo_model = build_model(name, seq_len=1 << 20, device="meta")
    tensors = [*zoo_model.model.parameters(), *zoo_model.example_inputs]
    assert tensors and all(t.is_meta for t in tensors)
    assert zoo_model.example_inputs[0].shape[1] == 1 << 20


def test_zoo_and_user_do_not_import_each_other():
    from pathlib import Path

    import attnkit.models

    folder = Path(attnkit.models.__file__).parent
    assert "attnkit.models.zoo" not in (folder / "user.py").read_text()
    assert "attnkit.models.user import" in (folder / "zoo.py").read_text()  # zoo dispatches to user, not back
    assert "class ZooModel" in (folder / "base.py").read_text()
