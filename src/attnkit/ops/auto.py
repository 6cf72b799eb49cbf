"""`backend="auto"`: the one rule table that ranks backends, and `select_backend()`.

A call takes the order of the first rule it matches and runs the first supported backend in
that order. To retune from measurements, edit ``RULES``: ``benchmarks/attention/run.py``
prints rules ordered by what it measured (``bench.attention.suggest_rules``) and reports, for
every shape, the fastest backend and whether auto was within 2% of it. Only backends registered
with ``auto=True`` are candidates. Choices are cached per (spec, layout) in the op's one cache
(``ops/cache.py``); call ``clear_caches()`` after changing ``RULES`` or ``BACKENDS`` by hand.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Hashable, Mapping

import torch

from attnkit.ops.cache import on_clear
from attnkit.ops.calls import forget_calls
from attnkit.ops.registry import BACKENDS, backend_support
from attnkit.ops.sdpa import cudnn_native_gqa
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
    dtypes: tuple[torch.dtype, ...] | None = None
    max_seq: int | None = None
    """Longest of Sq and Skv."""
    max_scores: int | None = None
    """Most attention scores per call, ``B * Hq * Sq * Skv``."""
    grouped: bool | None = None
    """True for grouped-query calls (fewer K/V heads than query heads)."""
    when: Callable[[], bool] | None = None
    """A condition on this process (the torch build, the GPU) besides the call, e.g. a kernel's feature."""

    def matches(self, spec: AttentionSpec) -> bool:
        head_dim = max(spec.head_dim, spec.head_dim_v)
        return (
            (self.device is None or self.device == spec.device)
            and (self.causal is None or self.causal == spec.causal)
            and (self.requires_grad is None or self.requires_grad == spec.requires_grad)
            and (self.max_head_dim is None or head_dim <= self.max_head_dim)
            and (self.dtypes is None or spec.dtype in self.dtypes)
            and (self.max_seq is None or max(spec.seq_q, spec.seq_kv) <= self.max_seq)
            and (self.max_scores is None or spec.batch * spec.heads_q * spec.seq_q * spec.seq_kv <= self.max_scores)
            and (self.grouped is None or self.grouped == (spec.heads_kv != spec.heads_q))
            and (self.when is None or self.when())
        )


RULES: tuple[Rule, ...] = (
    Rule(
        order=("efficient", "cudnn", "flash", "flex", "chunked", "math"),
        why="measured: H100, torch 2.11, bf16 inference, S128: up to B*H = 96 every kernel takes 6-9 us on the GPU and "
        "longer for the host to issue (cuDNN 27.1-27.2 us, flash 26.3-26.9, efficient 17.4-18.3), so the GPU waits "
        "for the host and the lightest binding wins (benchmarks/results/attention-host-nvidia-h100-2026-11-27-session7.json). "
        "Inside a whole forward the gap is wider: in BERT-128 at batch 64 (B*H = 768) one cuDNN call cost the host "
        "94-110 us of CPU time and one efficient call 62-70 (22 vs 36 us on the GPU), and the rewrite's forward ran "
        "1.034-1.035x faster than eager's with the efficient kernel, 0.985-0.988x with cuDNN "
        "(benchmarks/results/optimize/host-cpu-time-bert128-nvidia-h100-2026-11-28-session9-run4.json). "
        "Not while compiling: a compiled graph issues no Python per call",
        device="cuda",
        causal=False,
        requires_grad=False,
        max_seq=128,
        max_scores=64 * 12 * 128 * 128,  # B*H <= 768; longer sequences (S512: cuDNN 130 vs efficient 409 us on the GPU) keep cuDNN
        grouped=False,  # the efficient kernel would need K/V repeated to every query head
        when=lambda: not torch.compiler.is_compiling(),
    ),
    Rule(
        order=("flash", "cudnn", "efficient", "flex", "chunked", "math"),
        why="grouped-query calls where this torch's cuDNN op needs K and V repeated to every query head "
        "(ops.sdpa.cudnn_native_gqa is False): flash reads each K/V head once for its whole query group, while the "
        "copies cost more than cuDNN gains; the H100 optimize run had Llama-GQA's rewrite at 0.91x eager with "
        "cuDNN + copies (benchmarks/results/optimize/optimize-nvidia-h100-80gb-hbm3-2026-11-27.json). With native "
        "GQA the CUDA rule below applies (cuDNN first)",
        device="cuda",
        grouped=True,
        when=lambda: not cudnn_native_gqa(),
    ),
    Rule(
        order=("cudnn", "flash", "efficient", "flex", "chunked", "math"),
        why="measured: H100, torch 2.11, bf16: cuDNN fastest on every shape of the hd64/128, seq 1k-16k grid "
        "(benchmarks/results/attention-nvidia-h100-80gb-hbm3-2026-11-22.json; at hd128 s1k causal fwd cuDNN "
        "took 0.307 ms in one run and 0.156 ms in the next, flash 0.28 ms in both, so no special rule)",
        device="cuda",
    ),
    # CPU (benchmarks/results/attention-cpu-2026-11-27.json: 2-core CPU, torch 2.13, backends taking
    # turns, min of 7 rounds; two earlier runs of the script agreed on these rows): in bf16 the explicit
    # softmax beats the CPU flash kernel at short sequences; from S512 on flash wins in both dtypes.
    Rule(
        order=("math", "flash", "chunked", "flex"),
        why="measured (CPU, bf16 inference, S <= 256): math 0.8 vs flash 9.7 ms at B4 H8 S128 D64, "
        "12.9 vs 67.6 ms at S256 (benchmarks/results/attention-cpu-2026-11-27.json)",
        device="cpu",
        requires_grad=False,
        dtypes=(torch.bfloat16, torch.float16),
        max_seq=256,
    ),
    Rule(
        order=("math", "flash", "chunked", "flex"),
        why="measured (CPU, bf16 forward+backward, S <= 128): math 32 vs flash 116 ms at B4 H8 S128 D64 "
        "(causal 41 vs 48); at S256 flash is ahead (173 vs 208) (benchmarks/results/attention-cpu-2026-11-27.json)",
        device="cpu",
        requires_grad=True,
        dtypes=(torch.bfloat16, torch.float16),
        max_seq=128,
    ),
    Rule(
        order=("flash", "math", "chunked", "flex"),
        why="measured: 2-core CPU, torch 2.13: the flash kernel wins forward and forward+backward at S >= 512 "
        "in both dtypes (1.05-3.4x); float32 at S <= 256 is mixed in that noisy run (math ahead at S128 "
        "unmasked, 1.3 vs 4.9 ms forward; flash ahead causal), so no float32 rule was drawn from it "
        "(benchmarks/results/attention-cpu-2026-11-27.json); flex is not compiled on CPU",
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


def select_backend(spec: AttentionSpec, layout: Hashable = None) -> BackendChoice:
    """The backend ``auto`` runs for ``spec`` (cached; ``clear_caches()`` resets).

    ``layout`` (what ``attention()`` passes: the tensors' strides) keeps a run-time refusal of one
    odd call from changing the choice for other calls of the same spec.

    Example::

        select_backend(AttentionSpec(batch=1, heads_q=8, seq_q=128, head_dim=64))
        # BackendChoice(chosen='flash', order=flash > math > chunked > flex > cudnn > efficient
        #   rule: CPU: the SDPA flash kernel is the only fused one; ...
        #   math: ranked after 'flash'
        #   cudnn: cudnn runs on cuda only, got device 'cpu' ...)
    """
    if torch.compiler.is_compiling():  # Dynamo traces through an lru_cache (and warns): go to the rule directly
        return _choose.__wrapped__(spec, layout)
    return _choose(spec, layout)


@functools.lru_cache(maxsize=1024)
def _choose(spec: AttentionSpec, layout: Hashable) -> BackendChoice:
    rule = next(rule for rule in RULES if rule.matches(spec))
    # Opted-in backends no rule ranks stay reachable after the ranked ones.
    candidates = rule.order + tuple(name for name in BACKENDS if name not in rule.order)
    candidates = tuple(name for name in candidates if name in BACKENDS and BACKENDS[name].auto)
    support = backend_support(spec, layout)
    chosen = next(name for name in candidates if support[name] is None)
    rejected = MappingProxyType({name: support[name] or f"ranked after {chosen!r}" for name in candidates if name != chosen})
    return BackendChoice(chosen=chosen, candidates=candidates, rejected=rejected, rule=rule.why)


def _forget_choices() -> None:
    """Forget auto's choices, here and in ``attention()``'s per-call memo (run-time refusals stay)."""
    _choose.cache_clear()
    forget_calls()


on_clear(_choose.cache_clear)
# The functools.lru_cache API callers already use (optimize records a refusal, then clears the choices).
select_backend.cache_clear = _forget_choices
select_backend.cache_info = _choose.cache_info
