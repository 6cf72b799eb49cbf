"""`AttentionCore`: the attention of a rewritten module, on the backend ``attnkit.ops`` picks.

The backend is chosen per call signature (shapes, dtype, mask kind, causal, dropout, grad)
with ``attnkit.ops.select_backend``. In eager mode each choice is remembered on the module with
its reasons, so the report can say which kernel each attention ran and why, and later calls of
the same signature go straight to the backend without re-validating (the module built the
tensors, so their layout is known good).

Under ``torch.compile`` the choice is made while tracing, from the same rule table, and the
memo is neither read nor written: reading it would make the compiled graph guard on its
contents (and recompile whenever an eager call adds a signature), and adding to it from inside
the traced code would break the graph. The traced path has no Python-side state at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnkit.errors import UnsupportedError
from attnkit.ops import AttentionSpec, backend_support, select_backend
from attnkit.ops.registry import get_backend, record_runtime_rejection

__all__ = ["AttentionCore", "BackendDecision"]


@dataclass(frozen=True)
class BackendDecision:
    """The backend one call signature runs on, and why."""

    backend: str
    why: str
    rejected: dict[str, str]
    """Every other backend and the reason it lost."""
    spec: dict
    """The call (``AttentionSpec.to_json()``)."""


class AttentionCore(nn.Module):
    """``softmax(q k^T * scale + mask) v`` with dropout in training, GQA and bottom-right causal.

    Args:
        num_heads / num_kv_heads / head_dim: the head layout (``num_heads % num_kv_heads == 0``).
        scale: multiplies ``q k^T`` (T5 uses 1).
        dropout_p: attention-probability dropout, applied only when ``training``.
        backend: ``"auto"`` or an ``attnkit.ops`` backend name to force.
    """

    def __init__(self, *, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, dropout_p: float, backend: str = "auto"):
        super().__init__()
        assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.dropout_p, self.backend = scale, dropout_p, backend
        self.decisions: dict[tuple, BackendDecision] = {}
        """Eager calls' choices per call signature (what ``optimize``'s report lists)."""

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"scale={self.scale:.4g}, dropout_p={self.dropout_p}, backend={self.backend!r}"
        )

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None, causal: bool, training: bool
    ) -> torch.Tensor:
        """q ``(B, Hq, Sq, D)``, k/v ``(B, Hkv, Skv, D)`` -> ``(B, Hq, Sq, D)`` in q's dtype."""
        dropout_p = self.dropout_p if training else 0.0
        if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        grad = torch.is_grad_enabled()
        key = (
            q.device.type, q.dtype, *q.shape, k.shape[1], k.shape[2], v.shape[-1],
            "none" if mask is None else ("bool" if mask.dtype == torch.bool else "additive"), causal, dropout_p,
            grad and (q.requires_grad or k.requires_grad or v.requires_grad), grad and mask is not None and mask.requires_grad,
        )  # fmt: skip
        if torch.compiler.is_compiling():
            return self._run(self._choose(_spec(key)).backend, q, k, v, mask, causal, dropout_p)
        decision = self.decisions.get(key)
        if decision is None:
            decision = self.decisions[key] = self._choose(_spec(key))
        tried = set()
        while True:
            try:
                return self._run(decision.backend, q, k, v, mask, causal, dropout_p)
            except UnsupportedError as error:
                if self.backend != "auto" or decision.backend in tried:
                    raise
                tried.add(decision.backend)
                # The kernel refused at run time what its static rule allowed: remember, pick the next.
                record_runtime_rejection(decision.backend, _spec(key), str(error))
                select_backend.cache_clear()
                decision = self.decisions[key] = self._choose(_spec(key))

    def _run(self, backend: str, q, k, v, mask, causal: bool, dropout_p: float) -> torch.Tensor:
        if backend == "math" and q.dtype in (torch.float16, torch.bfloat16):
            # Like PyTorch's SDPA math kernel, do the explicit softmax in fp32 for half inputs.
            mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
            return self._run(backend, q.float(), k.float(), v.float(), mask, causal, dropout_p).to(q.dtype)
        out, _ = get_backend(backend).run(
            q, k, v, mask=mask, causal=causal, scale=self.scale, dropout_p=dropout_p, dropout_mask=None, return_lse=False
        )
        return out

    def _choose(self, spec: AttentionSpec) -> BackendDecision:
        """The backend for ``spec`` and why: ``select_backend``'s choice, or the forced backend if it can run it."""
        if self.backend == "auto":
            choice = select_backend(spec)
            return BackendDecision(choice.chosen, f"auto: {choice.rule}", dict(choice.rejected), spec.to_json())
        reason = get_backend(self.backend).support(spec)
        if reason is not None:
            usable = [name for name, why in backend_support(spec).items() if why is None]
            raise UnsupportedError(f"backend {self.backend!r} cannot run {spec}: {reason}. Usable here: {', '.join(usable)}.")
        return BackendDecision(self.backend, f"forced: backend={self.backend!r}", {}, spec.to_json())


def _spec(key: tuple) -> AttentionSpec:
    """The ``AttentionSpec`` of a call key (see ``AttentionCore.forward``).

    ``mask_requires_grad`` (T5's learned position bias in training) steers auto to the kernels
    that backpropagate into the mask.
    """
    device, dtype, batch, heads_q, seq_q, head_dim, heads_kv, seq_kv, head_dim_v, mask, causal, dropout_p, grad, mask_grad = key
    return AttentionSpec(
        batch=batch, heads_q=heads_q, seq_q=seq_q, head_dim=head_dim, heads_kv=heads_kv, seq_kv=seq_kv,
        head_dim_v=head_dim_v, device=device, dtype=dtype, mask=mask, causal=causal, dropout_p=dropout_p,
        requires_grad=grad, mask_requires_grad=mask_grad,
    )  # fmt: skip
