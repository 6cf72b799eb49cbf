"""Command-line inputs, checked before any work starts.

Each check raises :class:`~attnkit.errors.InvalidArgumentError` naming the option as the user
typed it (``--json``, ``MODEL``), what was expected and what came; ``cli/main.py`` prints it as
one line and exits 2. Commands call :func:`check_inputs` first, so a typo in ``--json`` costs no
model build and no analysis. Library errors that name a library parameter (``seq_len``) are
shown with the option's name (``--seq``) by :func:`cli_message`.
"""

from __future__ import annotations

import difflib
import json
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from attnkit.errors import AttnkitError, InvalidArgumentError, InvalidTypeError, check_arg, fail

__all__ = ["MAX_BATCH", "MAX_REPEATS", "MAX_SEQ", "check_inputs", "cli_message"]

MAX_SEQ = 1 << 20
"""Longest ``--seq`` accepted (tokens): past every model's context, so a typo such as 10000000
is an error instead of an attempt to allocate terabytes."""
MAX_BATCH = 1 << 16
"""Largest ``--batch`` accepted."""
MAX_REPEATS = 100_000
"""Most timed calls per measurement (``--repeats``)."""

_FLAGS = {
    "name": "MODEL",
    "model_or_name": "MODEL",
    "batch_size": "--batch",
    "seq_len": "--seq",
    "dtype": "--dtype",
    "device": "--device",
    "hardware": "--hardware",
    "measured": "--measured",
    "backend": "--backend",
    "backends": "--backends",
}
"""Library parameter -> the option that sets it, for errors raised below the CLI."""


def check_inputs(
    *,
    models: str | Sequence[str] | None = None,
    batch: int | Sequence[int] | None = None,
    seq: int | None = None,
    repeats: int | None = None,
    device: str | None = None,
    hardware: str | None = None,
    measured: Path | None = None,
    backend: str | None = None,
    backends: str | None = None,
    outputs: Mapping[str, Path | None] | None = None,
    output_dirs: Mapping[str, Path | None] | None = None,
) -> None:
    """Check a command's inputs; None means "not given" and is skipped.

    Args:
        models: ``MODEL``: zoo names are checked here, ``package.module:function`` when imported.
        batch, seq: ``--batch`` in ``[1, MAX_BATCH]``, ``--seq`` in ``[1, MAX_SEQ]``.
        repeats: ``--repeats`` in ``[1, MAX_REPEATS]``.
        device: ``--device``: ``cpu``, or ``cuda``/``cuda:N`` when that GPU is visible.
        hardware: ``--hardware``; when it names a file, the file must be a readable profile JSON.
        measured: ``--measured``: a readable profile JSON with measured records.
        backend / backends: ``--backend`` (one name or ``auto``) / ``--backends`` (comma-separated).
        outputs: option -> file to write: not a directory, in an existing writable directory.
        output_dirs: option -> directory to write into: a writable directory, or a new one
            in an existing writable directory.
    """
    if models is not None:
        for name in [models] if isinstance(models, str) else models:
            _check_model(name)
    for value in [batch] if batch is None or isinstance(batch, int) else batch:
        _check_range(value, "--batch", 1, MAX_BATCH)
    _check_range(seq, "--seq", 1, MAX_SEQ)
    _check_range(repeats, "--repeats", 1, MAX_REPEATS)
    _check_device(device)
    if hardware is not None and _names_file(hardware):
        _check_hardware_file(Path(hardware))
    if measured is not None:
        _check_measured(measured)
    if backend is not None and backend != "auto":
        _check_backends([backend], "--backend", "'auto' or one of")
    if backends is not None:
        _check_backends([name.strip() for name in backends.split(",")], "--backends", "comma-separated names from")
    for flag, path in (outputs or {}).items():
        if path is not None:
            _check_output_file(Path(path), flag)
    for flag, path in (output_dirs or {}).items():
        if path is not None:
            _check_output_dir(Path(path), flag)


def cli_message(error: AttnkitError) -> str:
    """``str(error)``, with a library parameter replaced by the option that sets it."""
    text = str(error)
    if isinstance(error, (InvalidArgumentError, InvalidTypeError)) and error.parameter in _FLAGS:
        return _FLAGS[error.parameter] + text[len(error.parameter) :]
    return text


def _check_range(value: int | None, flag: str, low: int, high: int) -> None:
    if value is not None:
        check_arg(low <= value <= high, flag, f"an integer from {low} to {high}", value)


def _check_model(name: str) -> None:
    from attnkit.models import list_models

    if ":" not in name and name not in list_models():  # user functions are checked where they are imported
        close = difflib.get_close_matches(name, list_models(), n=1)
        hint = f"Did you mean {close[0]!r}?" if close else "A model of your own is named 'package.module:function'."
        fail("MODEL", f"one of {list_models()} or 'package.module:function'", name, hint)


def _check_device(device: str | None) -> None:
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    check_arg(parsed is not None and parsed.type in ("cpu", "cuda"), "--device", "cpu, cuda or cuda:N", device)
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        check_arg(count > 0, "--device", "cpu (no CUDA GPU is visible: torch.cuda.is_available() is False)", device,
                  "Leave --device out to use what this machine has.")
        check_arg(parsed.index is None or parsed.index < count, "--device", f"cuda:0 to cuda:{count - 1} ({count} GPU(s) visible)", device)


def _check_backends(names: list[str], flag: str, expected: str) -> None:
    from attnkit.ops import BACKENDS

    for name in names:
        check_arg(name in BACKENDS, flag, f"{expected} {sorted(BACKENDS)}", name)


def _names_file(hardware: str) -> bool:
    """A ``--hardware`` value that names a file rather than a built-in profile."""
    path = Path(hardware)
    return path.suffix.lower() == ".json" or len(path.parts) > 1 or path.exists()


def _read_json(path: Path, flag: str, expected: str) -> Any:
    check_arg(path.exists(), flag, expected, str(path), "The file does not exist.")
    check_arg(path.is_file(), flag, expected, str(path), "It is not a file.")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        fail(flag, expected, str(path), f"Reading it failed: {error}.")


def _check_hardware_file(path: Path) -> None:
    from attnkit.measure import load_hardware

    expected = "a built-in hardware name or a profile JSON written by `attnkit calibrate`"
    data = _read_json(path, "--hardware", expected)
    check_arg(isinstance(data, dict) and isinstance(data.get("achievable_tflops"), dict), "--hardware", expected, str(path),
              "It has no 'achievable_tflops' object, so it is not a hardware profile.")
    _load(lambda: load_hardware(path), "--hardware", expected, path)


def _check_measured(path: Path) -> None:
    from attnkit.measure import load_measured

    expected = "a profile JSON written by `attnkit profile --json`"
    data = _read_json(path, "--measured", expected)
    check_arg(isinstance(data, dict) and isinstance(data.get("records"), list), "--measured", expected, str(path),
              "It has no 'records' list.")
    _load(lambda: load_measured(path), "--measured", expected, path)


def _load(loader, flag: str, expected: str, path: Path) -> None:
    """Run a library loader; a file it cannot read is this option's error."""
    try:
        loader()
    except AttnkitError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        fail(flag, expected, str(path), f"Reading it failed: {type(error).__name__}: {error}.")


def _check_output_file(path: Path, flag: str) -> None:
    expected = "a file path in an existing, writable directory"
    check_arg(not path.is_dir(), flag, expected, str(path), "It is a directory: name a file inside it.")
    parent = path.parent
    check_arg(parent.is_dir(), flag, expected, str(path),
              f"{parent} is not a directory." if parent.exists() else f"The directory {parent} does not exist: create it first.")
    if path.exists():
        _probe(lambda: open(path, "a").close(), flag, expected, path, "The file cannot be written")
    else:
        _probe(lambda: tempfile.TemporaryFile(dir=parent).close(), flag, expected, path, f"{parent} is not writable")


def _check_output_dir(path: Path, flag: str) -> None:
    expected = "a writable directory, or a new one in an existing writable directory"
    target = path if path.exists() else path.parent
    check_arg(target.is_dir(), flag, expected, str(path),
              "It is a file." if path.exists() else f"The directory {path.parent} does not exist: create it first.")
    _probe(lambda: tempfile.TemporaryFile(dir=target).close(), flag, expected, path, f"{target} is not writable")


def _probe(write, flag: str, expected: str, path: Path, what: str) -> None:
    """Try the write for real (permission bits alone say nothing for root or read-only mounts)."""
    try:
        write()
    except OSError as error:
        fail(flag, expected, str(path), f"{what} ({error.strerror or error}).")
