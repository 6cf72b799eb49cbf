"""The model zoo: named models with random weights and example inputs, no downloads.

``build_model("gpt2", seq_len=256)`` returns a :class:`ZooModel`; ``list_models()`` names them all.
"""

from attnkit.models.base import ZooModel
from attnkit.models.zoo import build_model, default_seq_len, list_models

__all__ = ["ZooModel", "build_model", "list_models", "default_seq_len"]
