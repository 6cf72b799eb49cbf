"""Malformed calls raise at the boundary with the parameter named; forced backends say why not."""

import pytest
import torch

from attnkit.errors import InvalidArgumentError, InvalidTypeError, UnsupportedError
from attnkit.ops import AttentionSpec, attention

Q, K, V = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 6)


@pytest.mark.parametrize(
    "args, kwargs, parameter",
    [
        ((Q[0], K, V), {}, "q"),
        ((Q, K[:1], V[:1]), {}, "k.shape[0] (batch)"),
        ((Q, K[..., :4], V), {}, "k.shape[3] (head dim)"),
        ((Q, K, V[:, :1]), {}, "v.shape[1] (heads)"),
        ((Q, K, V[:, :, :3]), {}, "v.shape[2] (sequence)"),
        ((Q[:, :3], K, V), {}, "k.shape[1] (KV heads)"),
        ((Q, K.double(), V), {}, "k.dtype"),
        ((Q.int(), K, V), {}, "q"),
        ((Q, K, V), {"mask": torch.ones(5, 6, dtype=torch.bool)}, "mask"),
        ((Q, K, V), {"mask": torch.ones(5, 7, dtype=torch.int64)}, "mask.dtype"),
        ((Q, K, V), {"dropout_p": 1.0}, "dropout_p"),
        ((Q, K, V), {"dropout_mask": torch.ones(5, 7, dtype=torch.bool)}, "dropout_p"),
        ((Q, K, V), {"dropout_p": 0.1, "dropout_mask": torch.ones(5, 7)}, "dropout_mask.dtype"),
        ((Q, K, V), {"scale": -1.0}, "scale"),
        ((Q, K, V), {"backend": "fastest"}, "backend"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_bad_arguments_name_the_parameter(args, kwargs, parameter):
    with pytest.raises(InvalidArgumentError) as info:
        attention(*args, **kwargs)
    assert info.value.parameter == parameter
    assert "expected" in str(info.value) and "got" in str(info.value)


def test_wrong_types():
    with pytest.raises(InvalidTypeError, match="q: expected Tensor"):
        attention(Q.numpy(), K, V)
    with pytest.raises(InvalidTypeError, match="causal"):
        attention(Q, K, V, causal=1)


def test_forced_backend_that_cannot_serve_says_why():
    with pytest.raises(UnsupportedError, match="'flash' cannot run this call: flash needs D == Dv.*Usable here: reference, math"):
        attention(Q, K, V, backend="flash")
    with pytest.raises(UnsupportedError, match="'cudnn'.*cuda only"):
        attention(Q, K, V[..., :8], backend="cudnn")


def test_spec_checks_its_fields():
    with pytest.raises(InvalidArgumentError, match="heads_kv: expected a divisor of heads_q=8"):
        AttentionSpec(batch=1, heads_q=8, heads_kv=3, seq_q=4, head_dim=8)
    with pytest.raises(InvalidArgumentError, match="mask: expected one of"):
        AttentionSpec(batch=1, heads_q=8, seq_q=4, head_dim=8, mask="float")
