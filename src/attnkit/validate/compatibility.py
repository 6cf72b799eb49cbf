"""Compatibility: the environment, and per attention layer which backends can run it and why not."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field

import torch

from attnkit.ops import AttentionSpec, backend_support
from attnkit.validate.sites import AttentionLayer

__all__ = ["Environment", "LayerSupport", "environment", "layer_support"]


@dataclass
class Environment:
    """Versions, device and what each backend can do on a plain call here."""

    python: str
    torch: str
    cuda: str | None
    cudnn: int | None
    device: str
    """``"cuda"`` or ``"cpu"``."""
    device_name: str
    capability: str | None
    sdpa_enabled: dict[str, bool]
    """PyTorch's global switches for its SDPA kernels (``torch.backends.cuda.*_sdp_enabled``)."""
    flex_available: bool
    mha_fastpath: bool
    backends: dict[str, str | None] = field(default_factory=dict)
    """Per attnkit backend: None if it runs a plain ``B1 H8 S128 D64`` call in the validated dtype here, else why not."""


@dataclass
class LayerSupport:
    """One group of identical attention layers and the backends that can run their call."""

    layer: AttentionLayer
    support: dict[str, str | None]
    """Per backend: None = can run the call, else the concrete reason (dtype, head dim, mask, device...)."""

    @property
    def usable(self) -> list[str]:
        """Backends that run the call and that the layer, as written, reaches."""
        return [] if self.layer.blockers else [name for name, why in self.support.items() if why is None]


def _flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def environment(device: torch.device, dtype: torch.dtype) -> Environment:
    """Describe this machine for ``device`` and ``dtype``."""
    cuda = device.type == "cuda"
    probe = AttentionSpec(batch=1, heads_q=8, seq_q=128, head_dim=64, device=device.type, dtype=dtype)
    return Environment(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        device=device.type,
        device_name=torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine()),
        capability=".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        sdpa_enabled={
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        },
        flex_available=_flex_available(),
        mha_fastpath=torch.backends.mha.get_fastpath_enabled(),
        backends=backend_support(probe),
    )


def layer_support(layers: list[AttentionLayer], backends: tuple[str, ...]) -> list[LayerSupport]:
    """For each layer group, ``backend_support`` of its call restricted to ``backends``."""
    result = []
    for layer in layers:
        support = backend_support(layer.attention_spec)
        result.append(LayerSupport(layer, {name: support[name] for name in backends if name in support}))
    return result

