"""Force one backend for a whole model: every SDPA call it makes, found by :mod:`attnkit.discover.runtime`.

This is how validate runs a model with backends PyTorch's ``sdpa_kernel`` does not know (``flex``,
``chunked``, a custom kernel) or pins one it does. Layers written as matmul + softmax never call SDPA
and keep running as written; validate says so per layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from attnkit.discover.runtime import intercept_attention
from attnkit.errors import UnsupportedError

__all__ = ["force_backend", "pass_through"]


@contextlib.contextmanager
def force_backend(backend) -> Iterator[None]:
    """Run every SDPA call of the block on ``backend`` (a name in ``BACKENDS`` or a callable like ``attention``).

    Raises:
        UnsupportedError: after the block, when a call could not be routed (``nn.MultiheadAttention`` on a
            torch without ``torch.overrides.redispatch_function``): its numbers are the default's.
    """
    with intercept_attention(lambda call, original: call.run(backend)) as mode:
        yield
    if mode.unrouted:
        raise UnsupportedError(
            f"routing {sorted(set(mode.unrouted))} to a backend needs torch.overrides.redispatch_function, which "
            f"torch {torch.__version__} lacks; upgrade torch to validate these layers.")


def pass_through() -> contextlib.AbstractContextManager:
    """Intercept every SDPA call and run it as the model made it: the default, with the same interception cost."""
    return intercept_attention(lambda call, original: original())
