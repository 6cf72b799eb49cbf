"""User models named ``package.module:function``.

The function returns a :class:`ZooModel`, ``(model, args)`` or ``(model, args, kwargs)``; ``args`` may be
a tuple or list of positional inputs or a single input (a lone tensor). It gets ``batch_size`` and
``seq_len`` as keywords when its signature has them.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from attnkit.errors import AttnkitError, InvalidTypeError, check_arg, fail
from attnkit.models.base import ZooModel

__all__ = ["build_user_model"]

_FORM = "'package.module:function'"
_RETURNS = "a ZooModel, (nn.Module, args) or (nn.Module, args, kwargs dict)"


def build_user_model(
    spec: str, *, batch_size: int, seq_len: int | None, dtype: torch.dtype, meta: bool = False
) -> ZooModel:
    """Call the function named by ``spec`` and return its model as a :class:`ZooModel` in ``dtype``.

    ``batch_size`` and ``seq_len`` are passed as keywords when the function's signature has them;
    a non-default value for one it lacks is an error rather than silently ignored. The user's
    weights are kept (only the dtype changes); ``model.eval()`` is up to the caller.

    ``meta=True`` calls the function under ``torch.device("meta")`` so tensors it makes without an
    explicit device have shapes only; a function that cannot run there is called normally instead
    (the caller moves the result to ``meta``).

    Raises:
        InvalidArgumentError: ``spec`` does not name an importable function, or a size it cannot take.
        InvalidTypeError: the function returned something else than the forms above.
        AttnkitError: the function raised; the message names it and the error.
    """
    function = _resolve(spec)
    parameters = inspect.signature(function).parameters
    kwargs = {}
    for key, value, default in (("batch_size", batch_size, 1), ("seq_len", seq_len, None)):
        if key in parameters:
            kwargs[key] = value
        else:
            check_arg(value == default, key, f"{default} for {spec!r}, whose function takes no {key} parameter", value)
    result = None
    if meta:
        try:
            with torch.device("meta"):
                result = function(**kwargs)
        except Exception:  # e.g. the function reads a tensor's value; a normal call is the fallback
            result = None
    if result is None:
        result = _call(spec, function, kwargs)
    zoo_model = _as_zoo_model(spec, result)
    zoo_model.model.to(dtype=dtype)
    return zoo_model


def _resolve(spec: str) -> Callable[..., Any]:
    module_name, _, function_name = spec.partition(":")
    check_arg(bool(module_name) and function_name.isidentifier(), "name", _FORM, spec)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        fail("name", f"{_FORM} with an importable module", spec, f"Importing {module_name!r} failed: {error}.")
    function = getattr(module, function_name, None)
    check_arg(callable(function), "name", f"{_FORM} naming a function in {module_name!r}", spec)
    return function


def _call(spec: str, function: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """``function(**kwargs)``; an exception becomes one AttnkitError naming the builder and the error."""
    try:
        return function(**kwargs)
    except AttnkitError:
        raise
    except Exception as error:  # the user's code: any exception type
        where = _user_frame(error, inspect.getsourcefile(function))
        raise AttnkitError(
            f"model builder {spec} raised {type(error).__name__}: {str(error).strip() or '(no message)'}{where}"
        ) from error


def _user_frame(error: Exception, filename: str | None) -> str:
    """`` (at file:line)`` of the innermost frame in the builder's file, or ""."""
    line, traceback = None, error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename == filename:
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    return "" if line is None else f" (at {filename}:{line})"


def _as_zoo_model(spec: str, result: Any) -> ZooModel:
    if isinstance(result, ZooModel):
        return replace(result, name=spec)
    if isinstance(result, tuple) and len(result) in (2, 3) and isinstance(result[0], nn.Module):
        args = result[1]
        kwargs = result[2] if len(result) == 3 else {}
        if isinstance(kwargs, dict) and all(isinstance(key, str) for key in kwargs):
            args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
            return ZooModel(spec, result[0], args, dict(kwargs), "user", "user", f"user function {spec}")
    raise InvalidTypeError(f"return value of {spec}", _RETURNS, result)
