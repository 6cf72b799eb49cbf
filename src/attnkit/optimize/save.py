"""Save an optimized model and load it back, rewritten again.

The weights are saved under the *original* model's names (fused projections are split back), so
the checkpoint is an ordinary one:

- transformers models: ``save_pretrained(directory)``; ``AutoModel...from_pretrained(directory)``
  loads it into a plain transformers model;
- other models: ``model.safetensors`` (``safetensors.torch.save_file``), loadable into the
  original architecture with ``load_state_dict``.

Next to it, ``attnkit_optimize.json`` records what ``optimize`` did (its options, the rewritten
module paths, the fusion plan), and :func:`load_optimized` replays exactly that on a freshly
loaded model: no example inputs and no equivalence run are needed to get the same model back.

Example::

    fast, report = optimize(model, (ids,))
    save_optimized(fast, report, "out/")
    again = load_optimized("out/")                   # transformers models
    again = load_optimized("out/", MyModel())        # anything else: pass the architecture
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import torch
from torch import nn

from attnkit.errors import check_arg, check_type, fail
from attnkit.optimize.config import OptimizeConfig
from attnkit.optimize.fuse import FusionPlan, apply_fusion, fused_groups
from attnkit.optimize.report import OptimizationReport
from attnkit.utils.dtypes import dtype_name, parse_dtype
from attnkit.utils.modules import model_dtype

__all__ = ["MANIFEST", "WEIGHTS", "save_optimized", "load_optimized"]

MANIFEST = "attnkit_optimize.json"
"""What ``optimize`` did, next to the weights."""
WEIGHTS = "model.safetensors"
"""The weights of a model that is not a transformers ``PreTrainedModel``."""
_SCHEMA = 1


def _is_pretrained(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _rewritten(report: OptimizationReport) -> bool:
    """Whether the model ``optimize`` returned with ``report`` is the rewritten one (not the original)."""
    return report.kept and (report.selection is None or report.selection.picked.startswith("rewrite"))


def save_optimized(model: nn.Module, report: OptimizationReport, directory: str | Path) -> Path:
    """Save ``model`` (as returned by ``optimize`` with ``report``) to ``directory``; returns the directory.

    Args:
        model: the optimized model (a ``torch.compile`` wrapper is unwrapped).
        report: the report ``optimize`` returned with it (the manifest is built from it).
        directory: created if needed; existing files of the same names are overwritten.
    """
    model = getattr(model, "_orig_mod", model)
    check_type(model, nn.Module, "model")
    check_type(report, OptimizationReport, "report", "Pass the report optimize() returned with the model.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rewritten = _rewritten(report)
    pretrained = _is_pretrained(model)
    manifest = {
        "schema": _SCHEMA,
        "format": "transformers" if pretrained else "safetensors",
        "model_class": type(model).__name__,
        "dtype": dtype_name(model_dtype(model)),
        "config": report.config,
        "rewrites": [r.path for r in report.rewrites] if rewritten else [],
        "fusion": fused_groups(model).to_json(),
    }
    if pretrained:
        model.save_pretrained(directory)
    else:
        from safetensors.torch import save_file

        save_file(_unshared(model.state_dict()), str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return directory


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with every tensor owning its memory (safetensors refuses views of one storage:
    fused projections' slices, tied weights)."""
    seen: set[int] = set()
    result = {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        ptr = tensor.untyped_storage().data_ptr()
        whole = tensor.is_contiguous() and tensor.storage_offset() == 0 and tensor.nbytes == tensor.untyped_storage().nbytes()
        result[key] = tensor if whole and ptr not in seen else tensor.contiguous().clone()
        seen.add(ptr)
    return result


def load_optimized(directory: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load what :func:`save_optimized` wrote and apply the same rewrites; returns the optimized model.

    Args:
        directory: written by :func:`save_optimized` (or ``attnkit optimize MODEL --save DIR``).
        model: the original architecture (any weights) to load into; may be omitted for
            transformers checkpoints, which are loaded with ``from_pretrained``.

    Returns:
        The model rewritten and fused as when it was saved, in the saved dtype, in eval mode.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    check_arg(manifest_path.is_file(), "directory", f"a directory holding {MANIFEST} (written by save_optimized)", str(directory))
    manifest = json.loads(manifest_path.read_text())
    check_arg(manifest.get("schema") == _SCHEMA, "directory", f"a manifest of schema {_SCHEMA}", manifest.get("schema"))
    check_type(model, (nn.Module, type(None)), "model")
    if model is None:
        check_arg(
            manifest["format"] == "transformers", "model", "the original architecture to load into", None,
            f"{directory} holds a {manifest['model_class']} that is not a transformers model: build one and pass it.",
        )  # fmt: skip
        model = _from_pretrained(directory, manifest["model_class"])
    else:
        missing, unexpected = model.load_state_dict(_read_weights(directory, manifest["format"]), strict=False)
        if missing or unexpected:
            fail("model", f"the architecture saved in {directory} ({manifest['model_class']})", type(model).__name__,
                 f"Missing keys {missing[:5]}, unexpected keys {unexpected[:5]}.")  # fmt: skip
    return _replay(model.eval(), manifest)


def _from_pretrained(directory: Path, class_name: str) -> nn.Module:
    import transformers

    cls = getattr(transformers, class_name, None)
    check_arg(cls is not None, "directory", "a checkpoint of a class transformers provides", class_name, "Pass the model to load into.")
    return cls.from_pretrained(directory)


def _read_weights(directory: Path, fmt: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors")) if fmt == "transformers" else [directory / WEIGHTS]
    check_arg(bool(files) and all(f.is_file() for f in files), "directory", "the saved weights (*.safetensors)", str(directory))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def _replay(model: nn.Module, manifest: dict) -> nn.Module:
    """Apply the saved rewrites (only at the saved paths), the saved dtype and the saved fusion plan."""
    from attnkit.optimize.api import optimize

    known = {f.name for f in fields(OptimizeConfig)}
    config = OptimizeConfig(**{k: v for k, v in manifest["config"].items() if k in known})
    config = replace(config, check=False, measure=False, select=False, compile="none", inplace=True, fuse_qkv=False, fp8=None, fp8_emulate=False)
    paths = set(manifest["rewrites"])
    if paths:
        model, _ = optimize(model, config=config, module_filter_fn=lambda module, fqn: fqn in paths)
    model = model.to(parse_dtype(manifest["dtype"]))
    return apply_fusion(model, FusionPlan.from_json(manifest["fusion"]))
