import pytest
import torch

from attnkit.errors import InvalidArgumentError
from attnkit.utils import dtype_name, parse_dtype


@pytest.mark.parametrize("value, expected", [
    ("fp32", torch.float32), ("float32", torch.float32), ("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16),
    ("fp16", torch.float16), ("half", torch.float16), ("fp64", torch.float64), ("double", torch.float64),
    ("torch.float16", torch.float16), (torch.bfloat16, torch.bfloat16),
])  # fmt: skip
def test_parse_dtype_accepts_names_and_dtypes(value, expected):
    assert parse_dtype(value) is expected
    assert parse_dtype(dtype_name(expected)) is expected


@pytest.mark.parametrize("value", ["int8", "", "bf 16", torch.int32, torch.float8_e4m3fn, 16, None])
def test_parse_dtype_rejects_with_the_parameter_name(value):
    with pytest.raises(InvalidArgumentError) as info:
        parse_dtype(value, "--dtype")
    assert info.value.parameter == "--dtype" and str(info.value).startswith("--dtype: expected")


def test_parse_dtype_none_only_when_allowed():
    assert parse_dtype(None, allow_none=True) is None
    with pytest.raises(InvalidArgumentError, match="dtype"):
        parse_dtype(None)
