"""How two runs of a model are compared: their float outputs, named inputs, full-fp32 seeded runs, and the fp32 rule.

Shared by :mod:`attnkit.optimize.equivalence` (eval, train, dropout checks) and
:mod:`attnkit.optimize.decoding` (cached decoding, ``generate()``).
"""

from __future__ import annotations

import contextlib
import inspect
import random
from typing import Any

import torch
from torch import nn

from attnkit.optimize.report import Check

__all__ = ["float_tensors", "named_inputs", "full_fp32", "tensor_errors", "fp32_check"]

_FLOOR = 1e-3


def float_tensors(value: Any) -> list[torch.Tensor]:
    """Every floating tensor inside a model output (tensors, tuples, lists, dicts, ModelOutputs), in order."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in float_tensors(item)]
    return []


def named_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """``args`` and ``kwargs`` by the names of ``model.forward``'s parameters (None if they do not bind)."""
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return None
    named: dict[str, Any] = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL and value:
            return None
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            named[name] = value
    return named


@contextlib.contextmanager
def full_fp32(seed: int | None = None):
    """fp32 matmuls and convolutions in full fp32 (no TF32), and with ``seed`` private, seeded
    random streams (so two models draw the same numbers): torch's, and Python's and NumPy's global
    ones, which models draw from too (Wav2Vec2's SpecAugment masks come from ``numpy.random``);
    everything restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []), _host_streams(seed):
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


@contextlib.contextmanager
def _host_streams(seed: int | None):
    """Python's and NumPy's global random streams seeded with ``seed`` inside, restored after (nothing when None)."""
    if seed is None:
        yield
        return
    try:
        import numpy
    except ImportError:  # NumPy is optional: nothing to seed
        numpy = None
    saved = random.getstate(), numpy.random.get_state() if numpy is not None else None
    random.seed(seed)
    if numpy is not None:
        numpy.random.seed(seed % 2**32)  # NumPy takes 0 <= seed < 2**32; torch and Python take any int
    try:
        yield
    finally:
        random.setstate(saved[0])
        if numpy is not None:
            numpy.random.set_state(saved[1])


def tensor_errors(got: list[torch.Tensor], ref: list[torch.Tensor]) -> list[tuple[float, float]]:
    """Per tensor: (max abs error, scale), scale = ``max|ref|`` floored at ``_FLOOR`` x the largest
    ``max|ref|`` of the set (some gradients are zero in exact arithmetic, e.g. of a key bias)."""
    assert len(got) == len(ref), (len(got), len(ref))
    result = []
    for a, b in zip(got, ref):
        assert a.shape == b.shape, (a.shape, b.shape)
        a, b = a.double(), b.double()
        result.append(((a - b).abs().max().item() if a.numel() else 0.0, b.abs().max().item() if b.numel() else 0.0))
    largest = max((scale for _, scale in result), default=0.0)
    return [(err, max(scale, _FLOOR * largest)) for err, scale in result]


def fp32_check(what: str, mode: str, got, ref, rtol: float) -> Check:
    """The fp32 rule: every tensor within ``rtol * max|ref|`` (floored, see :func:`tensor_errors`)."""
    errors = tensor_errors(got, ref)
    max_rel = max((err / max(scale, 1e-30) for err, scale in errors), default=0.0)
    max_abs = max((e for e, _ in errors), default=0.0)
    rule = f"|opt-orig| <= {rtol:g} max|orig|"
    return Check(what, mode, "float32", max_abs, max_rel, rtol, rule, max_rel <= rtol, ratio=max_rel / rtol, tensors=len(errors))
