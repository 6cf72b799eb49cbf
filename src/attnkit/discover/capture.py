"""Capture a model as an ATen graph with ``torch.export`` (non-strict, eval mode, no grad).

Export failures become :class:`~attnkit.errors.CaptureError` naming the construct that
could not be captured (the data-dependent guard, the operator, the output type) and a hint,
instead of a stack trace from inside the tracer.

Export traces on fake tensors, so a model and inputs on the ``meta`` device (no data) capture the
same graph as real CPU ones at no memory cost (they are traced as fake CPU tensors, see
:mod:`attnkit.discover.fake`). A forward taking ``use_cache`` gets ``use_cache=False``
unless the caller set it: a decoder would otherwise return a KV-cache object that export cannot
flatten (Hugging Face decoders and encoder-decoders), and the cache does not change the forward's work.
"""

from __future__ import annotations

import copy
import inspect
import re
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from attnkit.errors import CaptureError, check_type
from attnkit.discover.fake import fake_cpu_copy, has_meta
from attnkit.utils.modules import model_dtype
from attnkit.utils.trees import cast_floating

__all__ = ["CapturedGraph", "capture"]


@dataclass(frozen=True)
class CapturedGraph:
    """A model captured by :func:`capture`.

    Node names used by discovery and analysis refer to ``graph_module.graph``.
    """

    exported_program: torch.export.ExportedProgram
    """The program as returned by ``torch.export.export`` (weights lifted to inputs)."""
    graph_module: torch.fx.GraphModule
    """``exported_program.module()``: runnable with the example inputs, weights as ``get_attr``."""
    example_inputs: tuple[Any, ...]
    """Positional inputs used for export (cast to ``dtype`` when one was given)."""
    example_kwargs: dict[str, Any]
    """Keyword inputs used for export."""
    dtype: torch.dtype
    """Floating-point dtype of the model's parameters at capture."""
    num_nodes: int
    """Number of nodes in ``graph_module.graph`` (placeholders, weights and output included)."""
    seconds: float
    """Wall time that the export took."""

    def __repr__(self) -> str:
        return (
            f"CapturedGraph(nodes={self.num_nodes}, dtype={str(self.dtype).removeprefix('torch.')}, "
            f"seconds={self.seconds:.2f})"
        )


def capture(
    model: torch.nn.Module,
    example_inputs: tuple[Any, ...] | list[Any] | torch.Tensor,
    example_kwargs: dict[str, Any] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> CapturedGraph:
    """Export ``model`` in eval mode under ``torch.no_grad()`` with ``torch.export`` (non-strict).

    Args:
        model: the module to capture; its training flag is restored afterwards. On the ``meta`` device
            (with meta inputs) it is captured as fake CPU tensors: shapes only, no memory.
        example_inputs: positional inputs (a lone tensor is wrapped in a tuple).
        example_kwargs: keyword inputs, e.g. ``{"attention_mask": mask}``; ``use_cache=False`` is added
            when the forward takes ``use_cache`` and it is not given.
        dtype: if given, capture a copy of the model cast to this floating dtype, with
            floating-point inputs cast too; ``model`` itself is not changed.

    Returns:
        A :class:`CapturedGraph`.

    Raises:
        CaptureError: export failed; the message names the construct and a hint.

    Example::

        captured = capture(model, (input_ids,))
        captured.graph_module(input_ids, **captured.example_kwargs)
    """
    check_type(model, torch.nn.Module, "model")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    check_type(example_inputs, (tuple, list), "example_inputs", "Pass positional inputs as a tuple.")
    example_kwargs = _without_cache(model, dict(example_kwargs or {}))
    if dtype is not None:
        check_type(dtype, torch.dtype, "dtype")
        model, example_inputs, example_kwargs = _cast(model, tuple(example_inputs), example_kwargs, dtype)
    example_inputs = tuple(example_inputs)
    traced, traced_inputs, traced_kwargs = model, example_inputs, example_kwargs
    if has_meta(model, example_inputs, example_kwargs):
        traced, traced_inputs, traced_kwargs = fake_cpu_copy(model, example_inputs, example_kwargs)
        example_inputs, example_kwargs = traced_inputs, traced_kwargs
    was_training = model.training
    model.eval()
    traced.eval()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.export.export(traced, traced_inputs, traced_kwargs, strict=False)
    except Exception as error:  # export raises many unrelated types; all become CaptureError
        raise _capture_error(error) from error
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    graph_module = program.module()
    return CapturedGraph(
        exported_program=program,
        graph_module=graph_module,
        example_inputs=tuple(example_inputs),
        example_kwargs=example_kwargs,
        dtype=model_dtype(model),
        num_nodes=len(graph_module.graph.nodes),
        seconds=seconds,
    )


def _without_cache(model: torch.nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus ``use_cache=False`` when ``model.forward`` takes ``use_cache`` and it is not in ``kwargs``."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a signature (builtins): nothing to add
        return kwargs
    return {**kwargs, "use_cache": False} if "use_cache" in parameters and "use_cache" not in kwargs else kwargs


def _cast(model, inputs, kwargs, dtype):
    """Return a cast copy of the model and inputs (the copy keeps the caller's model intact)."""
    if model_dtype(model) != dtype:
        model = copy.deepcopy(model).to(dtype)
    return model, cast_floating(inputs, dtype), cast_floating(kwargs, dtype)


_GUARD = re.compile(r"Could not guard on data-dependent expression (.+?) \(unhinted")
_OUTPUT_TYPE = re.compile(r"Found <class '([\w.]+)'> in (output|input)")
_OPERATOR = re.compile(r"no fake impl registered for <\w+\((?:op=')?([\w:.]+)|'?(\w+::\w+)'?[^\n]*\b(?:Meta|fake)\b")


def _capture_error(error: Exception) -> CaptureError:
    """Translate an export exception into a CaptureError naming the construct and a fix."""
    text = str(error)
    location = _model_frame(error)
    if match := _GUARD.search(text):
        construct = f"a data-dependent guard on `{match.group(1)}`{location}"
        hint = (
            "Make the control flow static: do not branch on tensor values in Python "
            "(use torch.where or torch.cond, or torch._check to state the assumption)."
        )
    elif match := _OUTPUT_TYPE.search(text):
        type_name = match.group(1)
        construct = f"an {match.group(2)} of type {type_name} that torch.export cannot flatten"
        if "cache" in type_name.lower():
            hint = "Pass use_cache=False (e.g. example_kwargs={'use_cache': False}) so no KV cache is returned."
        else:
            hint = f"Return tensors (or tuples, lists, dicts of them), or register {type_name} with torch.utils._pytree."
    elif match := _OPERATOR.search(text):
        construct = f"the operator {match.group(1) or match.group(2)} (no fake/meta implementation){location}"
        hint = "Give the operator a fake (meta) implementation with torch.library.register_fake, or avoid it."
    else:
        first_line = next((line.strip() for line in text.splitlines() if line.strip()), "")
        construct = f"{type(error).__name__}: {first_line[:300]}{location}"
        hint = "torch.export.draft_export(model, args, kwargs) lists every problem in the model."
    return CaptureError(f"Could not capture the model: {construct}. {hint}")


def _model_frame(error: Exception) -> str:
    """`` at file:line in function: `code` `` for the innermost frame of model code (torch.nn counts), or ""."""
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not frame.filename.startswith("<")
        and frame.filename != __file__
        and ("/torch/" not in frame.filename or "/torch/nn/" in frame.filename)
    ]
    if not frames:
        return ""
    frame = frames[-1]
    return f" at {frame.filename}:{frame.lineno} in {frame.name}: `{(frame.line or '').strip()}`"
