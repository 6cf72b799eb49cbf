"""`AttentionSpec`: a tensor-free description of one attention call.

Backends decide from a spec alone whether they can run (see ``registry.backend_support``),
so validate and analyze can ask "why not flash here?" without building tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from attnkit.errors import fail
from attnkit.ops.options import MASK_KINDS, mask_kind

__all__ = ["AttentionSpec", "MASK_KINDS", "mask_kind"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionSpec:
    """One attention call: ``q (B, Hq, Sq, D)``, ``k (B, Hkv, Skv, D)``, ``v (B, Hkv, Skv, Dv)``."""

    batch: int
    heads_q: int
    seq_q: int
    head_dim: int
    heads_kv: int | None = None
    """Defaults to ``heads_q`` (plain multi-head attention)."""
    seq_kv: int | None = None
    """Defaults to ``seq_q`` (self-attention)."""
    head_dim_v: int | None = None
    """Defaults to ``head_dim``."""
    device: str = "cpu"
    """Device type: ``"cpu"``, ``"cuda"``, ..."""
    dtype: torch.dtype = torch.float32
    mask: str = "none"
    """One of ``MASK_KINDS``: no mask, bool (True = may attend), additive float, or a FlexAttention block mask."""
    causal: bool = False
    """Query ``i`` sees key ``j`` iff ``j <= i + causal_offset`` (default bottom-right, ``Skv - Sq``)."""
    causal_offset: int | None = None
    """None = bottom-right (``Skv - Sq``); else from the call's ``q_start - kv_start`` (a sequence shard)."""
    dropout_p: float = 0.0
    dropout_mask: bool = False
    """A caller-given keep-mask makes dropout reproducible; few kernels accept one."""
    need_lse: bool = False
    requires_grad: bool = False
    mask_requires_grad: bool = False
    """An additive mask that needs a gradient (a learned position bias in training)."""

    def __post_init__(self) -> None:
        # Fill defaults through object.__setattr__ because the dataclass is frozen. Checks are
        # `if not (condition): fail(...)` so that messages are formatted only on failure.
        for name, default in (("heads_kv", self.heads_q), ("seq_kv", self.seq_q), ("head_dim_v", self.head_dim)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        for name in ("batch", "heads_q", "heads_kv", "seq_q", "seq_kv", "head_dim", "head_dim_v"):
            value = getattr(self, name)
            least = 0 if name == "batch" else 1  # an empty batch is valid (as in torch) and returns an empty output
            if not (isinstance(value, int) and value >= least):
                fail(name, f"an int >= {least}", value)
        if not (self.causal_offset is None or isinstance(self.causal_offset, int)):
            fail("causal_offset", "None (bottom-right) or an int", self.causal_offset)
        if not (self.heads_q % self.heads_kv == 0):
            fail("heads_kv", f"a divisor of heads_q={self.heads_q}", self.heads_kv, "Query head h uses KV head h // (Hq // Hkv).")
        if not isinstance(self.device, str):
            fail("device", "a device type string such as 'cuda' or 'cpu'", self.device)
        if not (self.dtype in _DTYPES):
            fail("dtype", "one of float16, bfloat16, float32, float64", self.dtype)
        if not (self.mask in MASK_KINDS):
            fail("mask", f"one of {MASK_KINDS}", self.mask)
        if not (0.0 <= self.dropout_p < 1.0):
            fail("dropout_p", "a float in [0, 1)", self.dropout_p)
        if not (not self.mask_requires_grad or self.mask == "additive"):
            fail("mask_requires_grad", "True only with an additive mask", self.mask_requires_grad)
        if not (not self.dropout_mask or self.dropout_p > 0):
            fail("dropout_mask", "no dropout mask when dropout_p == 0", self.dropout_mask)

    @property
    def offset(self) -> int:
        """The causal offset: query ``i`` may see key ``j`` iff ``j <= i + offset``."""
        return self.seq_kv - self.seq_q if self.causal_offset is None else self.causal_offset

    @property
    def top_left_causal(self) -> bool:
        """Causal with offset 0: what SDPA's ``is_causal`` and cuDNN compute."""
        return self.causal and self.offset == 0

    @property
    def gqa_ratio(self) -> int:
        """Query heads per KV head (1 = MHA, ``heads_q`` = MQA)."""
        return self.heads_q // self.heads_kv

    def flops(self, *, backward: bool = False) -> float:
        """FLOPs at 2 per multiply-add: ``2*B*Hq*Sq*Skv*(D+Dv)`` forward, halved for causal (roughly),
        times 3.5 with backward (backward = 2.5x forward)."""
        forward = 2.0 * self.batch * self.heads_q * self.seq_q * self.seq_kv * (self.head_dim + self.head_dim_v)
        if self.causal:
            forward /= 2
        return forward * 3.5 if backward else forward

    def to_json(self) -> dict:
        record = asdict(self)
        record["dtype"] = str(self.dtype).removeprefix("torch.")
        return record
