"""The one dtype parser: names users type (``"bf16"``, ``"float32"``, ``"half"``) -> ``torch.dtype``.

Every command and config (`analyze`, `profile`, `optimize`, `validate`, `bench`) parses ``--dtype``
here, so they accept the same spellings and fail with the same message.
"""

from __future__ import annotations

import torch

from attnkit.errors import check_arg

__all__ = ["DTYPE_NAMES", "parse_dtype", "dtype_name"]

DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}  # fmt: skip
"""Accepted spellings (lower case; a ``torch.`` prefix is ignored) -> dtype."""
_SHORT = "fp32, bf16, fp16, fp64 (or float32, bfloat16, float16, float64, half, double, a torch.dtype)"


def parse_dtype(value: torch.dtype | str | None, parameter: str = "dtype", *, allow_none: bool = False) -> torch.dtype | None:
    """``"bf16"``, ``"bfloat16"``, ``"torch.bfloat16"``, ``torch.bfloat16`` -> ``torch.bfloat16``.

    Args:
        value: a floating ``torch.dtype`` among ``DTYPE_NAMES``' values, or one of its names.
        parameter: the name shown in the error (``"dtype"``, ``"--dtype"``).
        allow_none: return None for None instead of raising.

    Raises:
        InvalidArgumentError: naming ``parameter`` when ``value`` is anything else.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, torch.dtype):
        check_arg(value in DTYPE_NAMES.values(), parameter, _SHORT, value)
        return value
    key = value.lower().removeprefix("torch.") if isinstance(value, str) else None
    check_arg(key in DTYPE_NAMES, parameter, _SHORT, value)
    return DTYPE_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the inverse of :func:`parse_dtype` for reports)."""
    return str(dtype).removeprefix("torch.")
