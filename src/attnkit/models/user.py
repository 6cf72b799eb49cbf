"""User models named ``package.module:function``: the function returns a ZooModel or ``(model, example_inputs)``."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import replace

import torch
from torch import nn

from attnkit.errors import InvalidTypeError, check_arg, fail
from attnkit.models.zoo import ZooModel

_FORM = "'package.module:function'"


def build_user_model(spec: str, *, batch_size: int, seq_len: int | None, dtype: torch.dtype) -> ZooModel:
    """Call the function named by ``spec`` and return its model as a :class:`ZooModel` in ``dtype``.

    ``batch_size`` and ``seq_len`` are passed as keywords when the function's signature has them;
    a non-default value for one it lacks is an error rather than silently ignored. The user's
    weights are kept (only the dtype changes); ``model.eval()`` is up to the caller.
    """
    module_name, _, function_name = spec.partition(":")
    check_arg(bool(module_name) and function_name.isidentifier(), "name", _FORM, spec)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        fail("name", f"{_FORM} with an importable module", spec, f"Importing {module_name!r} failed: {error}.")
    function = getattr(module, function_name, None)
    check_arg(callable(function), "name", f"{_FORM} naming a function in {module_name!r}", spec)

    parameters = inspect.signature(function).parameters
    kwargs = {}
    for key, value, default in (("batch_size", batch_size, 1), ("seq_len", seq_len, None)):
        if key in parameters:
            kwargs[key] = value
        else:
            check_arg(value == default, key, f"{default} for {spec!r}, whose function takes no {key} parameter", value)
    result = function(**kwargs)

    if isinstance(result, ZooModel):
        zoo_model = replace(result, name=spec)
    elif isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module) and isinstance(result[1], tuple):
        zoo_model = ZooModel(spec, result[0], result[1], {}, "user", "user", f"user function {spec}")
    else:
        raise InvalidTypeError(f"return value of {spec}", "ZooModel or (nn.Module, tuple of example inputs)", result)
    zoo_model.model.to(dtype=dtype)
    return zoo_model
