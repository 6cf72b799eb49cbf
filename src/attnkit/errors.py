"""Errors that attnkit raises for user mistakes and unsupported requests.

Every message names the parameter, what was expected, what came, and where
possible the fix, e.g.::

    InvalidArgumentError: q: expected a 4-D tensor (B, H, S, D), got
    Tensor(shape=(2, 16, 64), dtype=float32, device=cpu). Add a heads dimension.
"""

from __future__ import annotations

from typing import Any, NoReturn

import torch

__all__ = [
    "AttnkitError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "UnsupportedError",
    "CaptureError",
    "describe",
    "check_arg",
    "check_type",
    "fail",
]


class AttnkitError(Exception):
    """Base class of every error attnkit raises on purpose."""


class InvalidArgumentError(AttnkitError, ValueError):
    """A value is outside what the parameter accepts."""

    def __init__(self, parameter: str, expected: str, got: Any, hint: str | None = None):
        self.parameter, self.expected, self.got, self.hint = parameter, expected, got, hint
        message = f"{parameter}: expected {expected}, got {describe(got)}."
        super().__init__(f"{message} {hint}" if hint else message)


class InvalidTypeError(AttnkitError, TypeError):
    """A value has the wrong type for the parameter."""

    def __init__(self, parameter: str, expected: str, got: Any, hint: str | None = None):
        self.parameter, self.expected, self.got, self.hint = parameter, expected, got, hint
        message = f"{parameter}: expected {expected}, got {type(got).__name__} {describe(got)}."
        super().__init__(f"{message} {hint}" if hint else message)


class UnsupportedError(AttnkitError, RuntimeError):
    """A valid request that this device, dtype or backend cannot serve (the message says why)."""


class CaptureError(AttnkitError, RuntimeError):
    """A model could not be captured as a graph; the message names the construct and a hint."""


def describe(value: Any) -> str:
    """A short, readable description of ``value`` for error messages (tensors by shape, not content)."""
    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={str(value.dtype).removeprefix('torch.')}, device={value.device})"
    if isinstance(value, str):
        return repr(value)
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def check_arg(condition: bool, parameter: str, expected: str, got: Any, hint: str | None = None) -> None:
    """Raise :class:`InvalidArgumentError` unless ``condition`` holds."""
    if not condition:
        raise InvalidArgumentError(parameter, expected, got, hint)


def check_type(value: Any, types: type | tuple[type, ...], parameter: str, hint: str | None = None) -> None:
    """Raise :class:`InvalidTypeError` unless ``value`` is an instance of ``types``."""
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise InvalidTypeError(parameter, names, value, hint)


def fail(parameter: str, expected: str, got: Any, hint: str | None = None) -> NoReturn:
    """Raise :class:`InvalidArgumentError` unconditionally (for branches that already know)."""
    raise InvalidArgumentError(parameter, expected, got, hint)
