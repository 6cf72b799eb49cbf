"""model_dtype / model_device: the one answer to "what dtype and device is this model in"."""

import pytest
import torch
from torch import nn

from attnkit.utils import model_device, model_dtype


class _BufferOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("steps", torch.zeros(3, dtype=torch.long))
        self.register_buffer("scale", torch.ones(3, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_first_floating_parameter_wins(dtype):
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4)).to(dtype)
    model.register_buffer("ids", torch.arange(3))  # an integer buffer is skipped
    assert model_dtype(model) == dtype and model_device(model) == torch.device("cpu")


def test_buffers_then_the_default():
    assert model_dtype(_BufferOnly()) == torch.float16
    assert model_dtype(nn.ReLU()) == torch.get_default_dtype() and model_device(nn.ReLU()) == torch.device("cpu")
    assert model_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")
