"""`AttentionCore`: the attention of a rewritten module, on the backend ``attnkit.ops`` picks.

The backend is chosen once per call signature (shapes, dtype, mask kind, causal, dropout,
grad) with ``attnkit.ops.select_backend`` and remembered with its reasons, so the report can say
which kernel each attention ran and why; later calls of the same signature go straight to the
backend without re-validating (the module built the tensors, so their layout is known good).
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
        mask_kind = "none" if mask is None else ("bool" if mask.dtype == torch.bool else "additive")
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        mask_grad = torch.is_grad_enabled() and mask is not None and mask.requires_grad
        key = (q.device.type, q.dtype, *q.shape, k.shape[1], k.shape[2], v.shape[-1], mask_kind, causal, dropout_p, grad, mask_grad)
        decision = self.decisions.get(key)
        if decision is None:
            decision = self._decide(key)
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
                getattr(select_backend, "cache_clear", lambda: None)()
                decision = self._decide(key)

    def _run(self, backend: str, q, k, v, mask, causal: bool, dropout_p: float) -> torch.Tensor:
        if backend == "math" and q.dtype in (torch.float16, torch.bfloat16):
            # Like PyTorch's SDPA math kernel, do the explicit softmax in fp32 for half inputs.
            mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
            return self._run(backend, q.float(), k.float(), v.float(), mask, causal, dropout_p).to(q.dtype)
        out, _ = get_backend(backend).run(
            q, k, v, mask=mask, causal=causal, scale=self.scale, dropout_p=dropout_p, dropout_mask=None, return_lse=False
        )
        return out

    @torch.compiler.disable
    def _decide(self, key: tuple) -> BackendDecision:
        spec, device, mask_grad = _spec(key), key[0], key[-1]
        if self.backend == "auto" and mask_grad:
            # AttentionSpec cannot say "the mask needs a gradient" (T5's learned position bias in
            # training); of the kernels only mem-efficient SDPA backpropagates into attn_mask.
            support = backend_support(spec)
            order = ("efficient", "math") if device == "cuda" else ("math",)
            chosen = next(name for name in order if support.get(name, "") is None)
            why = "the additive mask needs a gradient (learned position bias): only efficient/math backpropagate into it"
            rejected = {n: r or "cannot backpropagate into the mask" for n, r in support.items() if n != chosen}
            decision = BackendDecision(chosen, why, rejected, spec.to_json())
        elif self.backend == "auto":
            choice = select_backend(spec)
            decision = BackendDecision(choice.chosen, f"auto: {choice.rule}", dict(choice.rejected), spec.to_json())
        else:
            support = backend_support(spec)
            if support.get(self.backend, "unknown backend") is not None:
                usable = [name for name, why in support.items() if why is None]
                reason = support.get(self.backend, "unknown backend")
                raise UnsupportedError(f"backend {self.backend!r} cannot run {spec}: {reason}. Usable here: {', '.join(usable)}.")
            decision = BackendDecision(self.backend, f"forced: backend={self.backend!r}", {}, spec.to_json())
        self.decisions[key] = decision
        return decision


def _spec(key: tuple) -> AttentionSpec:
    """The ``AttentionSpec`` of a decision key (see ``AttentionCore.forward``)."""
    device, dtype, batch, heads_q, seq_q, head_dim, heads_kv, seq_kv, head_dim_v, mask, causal, dropout_p, grad, _ = key
    return AttentionSpec(
        batch=batch, heads_q=heads_q, seq_q=seq_q, head_dim=head_dim, heads_kv=heads_kv, seq_kv=seq_kv,
        head_dim_v=head_dim_v, device=device, dtype=dtype, mask=mask, causal=causal, dropout_p=dropout_p,
        requires_grad=grad,
    )  # fmt: skip
