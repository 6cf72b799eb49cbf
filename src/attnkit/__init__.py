"""attnkit: see, speed up, scale and prove the attention in PyTorch models."""

from attnkit.errors import AttnkitError, CaptureError, InvalidArgumentError, UnsupportedError

__version__ = "0.1.0"

__all__ = ["__version__", "AttnkitError", "CaptureError", "InvalidArgumentError", "UnsupportedError"]
