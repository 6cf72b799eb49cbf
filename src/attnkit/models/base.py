"""``ZooModel``: a model with example inputs, what every builder (zoo or user) returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["ZooModel"]


@dataclass(frozen=True)
class ZooModel:
    """A model ready to run: ``model(*example_inputs, **example_kwargs)``."""

    name: str
    """Registry name, or ``package.module:function`` for a user model."""
    model: nn.Module
    """Random weights, eval mode (on the ``meta`` device: shapes only, see ``build_model``)."""
    example_inputs: tuple
    """Positional inputs."""
    example_kwargs: dict
    """Keyword inputs."""
    source: str
    """Where the architecture comes from: ``"torchvision"``, ``"transformers"``, ``"torch.nn"`` or ``"user"``."""
    family: str
    """``"vit"``, ``"bert"``, ``"gpt2"``, ``"llama"``, ``"t5"``, ``"nn.transformer"`` or ``"user"``."""
    notes: str
    """How it was built, e.g. which fallback stood in for a missing package."""

    def __repr__(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        return f"ZooModel(name={self.name!r}, source={self.source!r}, family={self.family!r}, params={params / 1e6:.1f}M)"
