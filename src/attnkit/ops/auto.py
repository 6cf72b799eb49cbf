"""`backend="auto"`: the one rule table that ranks backends, and `select_backend()`.

A call takes the order of the first rule it matches and runs the first supported backend in
that order. To retune from measurements, edit ``RULES``: ``benchmarks/attention/run.py``
prints rules ordered by what it measured (``bench.attention.suggest_rules``) and reports, for
every shape, the fastest backend and whether auto was within 2% of it. Choices are cached per
spec (and per call in ``attention()``'s memo, see ``ops/calls.py``); call
``select_backend.cache_clear()`` after changing ``RULES`` or ``BACKENDS`` at run time: it clears both.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from attnkit.ops.calls import forget_calls
from attnkit.ops.registry import BACKENDS, backend_support
from attnkit.ops.spec import AttentionSpec

__all__ = ["Rule", "RULES", "BackendChoice", "select_backend"]


@dataclass(frozen=True)
class Rule:
    """Backends to try, fastest first, for calls matching every given field (None = any)."""

    order: tuple[str, ...]
    why: str
    """Where the ordering comes from (a measurement, a file under benchmarks/results/)."""
    device: str | None = None
    causal: bool | None = None
    requires_grad: bool | None = None
    """True for training calls (forward + backward), False for inference."""
    max_head_dim: int | None = None

    def matches(self, spec: AttentionSpec) -> bool:
        head_dim = max(spec.head_dim, spec.head_dim_v)
        return (
            (self.device is None or self.device == spec.device)
            and (self.causal is None or self.causal == spec.causal)
            and (self.requires_grad is None or self.requires_grad == spec.requires_grad)
            and (self.max_head_dim is None or head_dim <= self.max_head_dim)
        )


RULES: tuple[Rule, ...] = (
    Rule(
        order=("cudnn", "flash", "efficient", "flex", "chunked", "math"),
        why="measured: H100, torch 2.11, bf16: cuDNN fastest on every shape of the hd64/128, seq 1k-16k grid "
        "(benchmarks/results/attention-nvidia-h100-80gb-hbm3-2026-11-22.json; at hd128 s1k causal fwd cuDNN "
        "took 0.307 ms in one run and 0.156 ms in the next, flash 0.28 ms in both, so no special rule)",
        device="cuda",
    ),
    Rule(
        order=("flash", "math", "chunked", "flex"),
        why="CPU: the SDPA flash kernel is the only fused one; flex is not compiled on CPU",
        device="cpu",
    ),
    Rule(order=("math", "chunked"), why="other devices: plain PyTorch runs everywhere"),
)


@dataclass(frozen=True)
class BackendChoice:
    """What ``auto`` picked for a call, the order it tried, and why each other backend lost."""

    chosen: str
    candidates: tuple[str, ...]
    rejected: Mapping[str, str]
    """Read-only (choices are cached and shared): backend -> why it was not chosen."""
    rule: str

    def __repr__(self) -> str:
        lines = [f"BackendChoice(chosen={self.chosen!r}, order={' > '.join(self.candidates)}", f"  rule: {self.rule}"]
        lines += [f"  {name}: {reason}" for name, reason in self.rejected.items()]
        return "\n".join(lines) + ")"


def select_backend(spec: AttentionSpec) -> BackendChoice:
    """The backend ``auto`` runs for ``spec`` (cached per spec; ``select_backend.cache_clear()`` resets).

    Example::

        select_backend(AttentionSpec(batch=1, heads_q=8, seq_q=128, head_dim=64))
        # BackendChoice(chosen='flash', order=flash > math > chunked > flex > cudnn > efficient
        #   rule: CPU: the SDPA flash kernel is the only fused one; ...
        #   math: ranked after 'flash'
        #   cudnn: cudnn runs on cuda only, got device 'cpu' ...)
    """
    return _choose(spec)


@functools.lru_cache(maxsize=1024)
def _choose(spec: AttentionSpec) -> BackendChoice:
    rule = next(rule for rule in RULES if rule.matches(spec))
    # Backends no rule ranks (except the float64 reference) stay reachable as a last resort.
    candidates = rule.order + tuple(name for name in BACKENDS if name not in rule.order and name != "reference")
    candidates = tuple(name for name in candidates if name in BACKENDS)
    support = backend_support(spec)
    chosen = next(name for name in candidates if support[name] is None)
    rejected = MappingProxyType({name: support[name] or f"ranked after {chosen!r}" for name in candidates if name != chosen})
    return BackendChoice(chosen=chosen, candidates=candidates, rejected=rejected, rule=rule.why)


def _cache_clear() -> None:
    """Forget every cached choice, here and in ``attention()``'s per-call memo."""
    _choose.cache_clear()
    forget_calls()


# The functools.lru_cache API callers already use, now clearing the per-call memo too.
select_backend.cache_clear = _cache_clear
select_backend.cache_info = _choose.cache_info
