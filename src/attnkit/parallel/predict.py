"""Cost model of one context-parallel attention layer: forward + backward time per rank.

For ``ring`` (``ring_attention``), ``ulysses`` (``ulysses_attention``) and ``hybrid``
(``hybrid_attention``, Ulysses over ``U`` ranks x ring over ``R``) on a group of ``W`` GPUs, from the
global shape (an :class:`~attnkit.ops.spec.AttentionSpec` with ``seq_q`` = the global ``S``) and a
:class:`CPHardware`. Every term is a count of what the code in this package runs:

* **compute**: the FLOPs of each kernel call (README conventions: 2 per multiply-add, forward
  ``2*B*Hq*Sq*Skv*(D+Dv)``, halved for a causal block, backward 2.5x forward) at the attention rate;
* **link**: bytes over the GPU's link per direction. Ring, per step: the next K/V block (input
  dtype; forward and backward), and in backward the dK/dV sums of the other ranks' shares
  travelling with it (one share in the input dtype, more in float32); the last sums arrive after
  the last step, exposed. Ulysses: q, k, v to head shards and out back (forward), grad_out in and
  dq, dk, dv back (backward), each rank sending ``(W-1)/W`` of each tensor, in four exchanges (the
  hybrid's Ulysses part: one per tensor, and lse too);
* **memory**: bytes of the memory-bound passes around the kernels at HBM bandwidth: the float32
  merge of each partial output (``ring.merge_partials``), the float32 gradient sums, the K/V half
  blocks a zigzag step copies, the accumulators' zero-fill and final cast, and two copies per
  all-to-all (the reorder to and from head shards);
* **overhead**: a fixed cost per ring step and per all-to-all (kernel launches, NCCL's start).

A ring step costs ``compute + link - overlap * min(compute, link) + memory + overhead``: ``overlap``
is the fraction of the shorter of the two that runs under the other (1 = the transfer hides fully,
as the ring is written to do; 0 = one after the other). All-to-alls are never overlapped.
The prediction is the slowest rank's time (every rank waits for its ring neighbour each step).

The attention rate is best calibrated from a measured one-GPU time (:meth:`CPHardware.calibrated`):
a ring step is one kernel of ``S/W`` query and key rows, a Ulysses kernel one of ``S`` rows and
``H/W`` heads, and the rate of such kernels is closer to a measured fused kernel than to a profile's
generic number. Validated against ``benchmarks/results/parallel/parallel-nvidia-h200-{2,4}gpu-2026-11-27.json``
in ``tests/parallel/test_predict.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from attnkit.errors import check_arg, check_type
from attnkit.hardware.profiles import HardwareProfile, interpolate_log, dtype_key
from attnkit.ops.spec import AttentionSpec
from attnkit.parallel.layout import LAYOUTS, check_layout

__all__ = ["CPHardware", "CPPrediction", "CP_METHODS", "predict_cp_time"]

CP_METHODS = ("ring", "ulysses", "hybrid")
"""Methods :func:`predict_cp_time` models."""

_BACKWARD = 2.5
"""Backward FLOPs per forward FLOP (README conventions)."""


@dataclass(frozen=True)
class CPHardware:
    """One GPU of a context-parallel group and its link. Rates in TFLOP/s (1e12 FLOP/s), bandwidths in
    GB/s (1e9 B/s), overheads in microseconds."""

    attention_tflops: tuple[tuple[int, float], ...]
    """``((Skv, TFLOP/s), ...)`` ascending: the fused attention rate (FLOPs counted as in the module
    docstring, forward and backward alike) of a kernel with ``Skv`` keys, interpolated in ``log(Skv)`` and
    clamped at both ends; one point = the same rate for every block size."""
    link_gbs: float = 350.0
    """Achievable bandwidth per direction of one GPU's link to its peers. H100/H200 SXM NVLink4 through
    NVSwitch: 450 GB/s per direction on paper, about 350 GB/s achieved by large NCCL transfers; this one
    number serves the ring's send/receive and the all-to-alls."""
    memory_gbs: float = 3000.0
    """HBM bandwidth (bytes read + written) of the memory-bound passes: the H100 profile's 3 TB/s for
    elementwise kernels (H200's 4.8 TB/s peak gives about 4.1)."""
    overlap: float = 0.0
    """Fraction of the shorter of a ring step's compute and transfer that runs under the other.
    The default 0 (serialized) is what the committed H200 measurements show (torch 2.11, NCCL P2P next
    to cuDNN kernels): with 1 the 4-GPU 32k ring would take 8.8 ms, measured 11.0 ms, 0 predicts
    11.1 ms (its transfers add up to 2.7 ms). Whether the transfer waits for SMs the attention kernel
    holds, or something else costs the same per step, needs a profiler trace to tell. Set 1 for the
    schedule the ring is written for."""
    step_overhead_us: float = 25.0
    """Fixed device time per ring step (forward or backward) and per all-to-all: about ten kernel
    launches at the profiles' 2.5 us, and NCCL's start."""
    name: str = "custom"
    """Where the numbers come from (for reports)."""

    def __post_init__(self):
        points = self.attention_tflops
        check_arg(
            isinstance(points, tuple) and len(points) >= 1 and all(len(p) == 2 and p[0] > 0 and p[1] > 0 for p in points)
            and [p[0] for p in points] == sorted(p[0] for p in points),
            "attention_tflops", "((Skv, TFLOP/s), ...) with positive values, Skv ascending", points,
        )
        for name in ("link_gbs", "memory_gbs"):
            check_arg(getattr(self, name) > 0, name, "a positive bandwidth in GB/s", getattr(self, name))
        check_arg(0.0 <= self.overlap <= 1.0, "overlap", "a fraction in [0, 1]", self.overlap)
        check_arg(self.step_overhead_us >= 0, "step_overhead_us", "a time >= 0 in microseconds", self.step_overhead_us)

    def attention_rate(self, seq_kv: int) -> float:
        """Fused attention rate in FLOP/s of a kernel with ``seq_kv`` keys."""
        return 1e12 * interpolate_log([list(p) for p in self.attention_tflops], seq_kv)

    @classmethod
    def calibrated(cls, spec: AttentionSpec, ms: float, *, profile: HardwareProfile | None = None, **fields) -> "CPHardware":
        """The rate of one measured one-GPU forward + backward: ``rate = spec.flops(backward=True) / time``.

        Args:
            spec: the measured call, ``(B, H, S0, D)`` on one GPU (``seq_kv`` is the ``Skv`` of the point).
            ms: its measured forward + backward time in milliseconds.
            profile: when its ``attention_tflops_by_seq`` lists ``spec.dtype``, that curve's shape
                scaled through the measured point (the block-size effect); else one flat rate.
            fields: the other fields (``link_gbs``, ``overlap``, ...); ``memory_gbs`` defaults to the
                profile's achievable bandwidth when a profile is given.

        Example::

            hw = CPHardware.calibrated(AttentionSpec(1, 16, 131072, 128, causal=True, dtype=torch.bfloat16), 468.7)
        """
        check_type(spec, AttentionSpec, "spec")
        check_arg(ms > 0, "ms", "a measured time > 0 in milliseconds", ms)
        tflops = spec.flops(backward=True) / (ms * 1e-3) / 1e12
        points: tuple[tuple[int, float], ...] = ((spec.seq_kv, tflops),)
        if profile is not None:
            fields.setdefault("memory_gbs", profile.achievable_bandwidth_gbs)
            curve = profile.attention_tflops_by_seq.get(dtype_key(spec.dtype))
            if curve:
                scale = tflops / interpolate_log(curve, spec.seq_kv)
                points = tuple((int(s), r * scale) for s, r in curve)
        fields.setdefault("name", f"calibrated: {ms:g} ms at S={spec.seq_kv} ({tflops:.0f} TFLOP/s)")
        return cls(attention_tflops=points, **fields)

    @classmethod
    def from_profile(cls, profile: HardwareProfile, dtype: torch.dtype, **fields) -> "CPHardware":
        """The profile's fused-attention rate for ``dtype`` (its sequence curve when listed) and memory
        bandwidth; the link and the rest from ``fields`` or the defaults. Profiles list a generic SDPA
        rate (H200: 340 TFLOP/s, where cuDNN at head dim 128 reaches ~525): prefer :meth:`calibrated`."""
        check_type(profile, HardwareProfile, "profile")
        curve = profile.attention_tflops_by_seq.get(dtype_key(dtype))
        points = tuple((int(s), float(r)) for s, r in curve) if curve else ((1, profile.attention_rate(dtype) / 1e12),)
        fields.setdefault("memory_gbs", profile.achievable_bandwidth_gbs)
        fields.setdefault("name", f"profile {profile.key}")
        return cls(attention_tflops=points, **fields)


@dataclass(frozen=True)
class CPPrediction:
    """Predicted forward + backward time of one attention layer on the slowest rank, in milliseconds.
    ``total_ms = compute_ms + link_ms + memory_ms + overhead_ms - hidden_ms``."""

    method: str
    world_size: int
    total_ms: float
    compute_ms: float
    """Attention kernels."""
    link_ms: float
    """Every transfer at the link bandwidth, hidden or not."""
    hidden_ms: float
    """The part of ``link_ms`` (or of the compute) that ran under the other (``overlap``)."""
    memory_ms: float
    """Memory-bound passes (merges, gradient sums, copies, reorders)."""
    overhead_ms: float
    """Fixed costs per ring step and per all-to-all."""
    link_bytes: float
    """Bytes this rank sends (= receives)."""
    flops: float
    """This rank's attention FLOPs, forward + backward."""
    ulysses_size: int | None = None
    """``U`` of a hybrid (``R = world_size / U``)."""
    hardware: str = field(default="", compare=False)

    def to_json(self) -> dict:
        return asdict(self)

    def __repr__(self) -> str:
        shape = f" {self.ulysses_size}x{self.world_size // self.ulysses_size}" if self.ulysses_size else ""
        return (f"CPPrediction({self.method}{shape} x{self.world_size}: {self.total_ms:.2f} ms = compute {self.compute_ms:.2f} "
                f"+ link {self.link_ms:.2f} - hidden {self.hidden_ms:.2f} + memory {self.memory_ms:.2f} + overhead {self.overhead_ms:.2f})")


@dataclass
class _Tally:
    """Seconds, bytes and FLOPs of one rank, summed term by term."""

    compute: float = 0.0
    link: float = 0.0
    hidden: float = 0.0
    memory: float = 0.0
    overhead: float = 0.0
    link_bytes: float = 0.0
    flops: float = 0.0

    @property
    def total(self) -> float:
        return self.compute + self.link - self.hidden + self.memory + self.overhead

    def add(self, other: "_Tally") -> "_Tally":
        return _Tally(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))


def predict_cp_time(
    spec: AttentionSpec,
    method: str,
    world_size: int,
    hardware: CPHardware,
    *,
    ulysses_size: int | None = None,
    layout: str = "zigzag",
) -> CPPrediction:
    """Predicted forward + backward time per rank of one context-parallel attention layer.

    Args:
        spec: the global call: ``q (B, Hq, S, D)``, ``k (B, Hkv, S, D)``, ``v (B, Hkv, S, Dv)`` with
            ``S = spec.seq_q`` the whole sequence (self-attention), ``spec.causal``, ``spec.dtype``.
        method: ``"ring"``, ``"ulysses"`` or ``"hybrid"``.
        world_size: ranks ``W`` in the group (hybrid: ``U * R``).
        hardware: one GPU's rate, link and memory bandwidth (:class:`CPHardware`).
        ulysses_size: ``U`` of a hybrid (Ulysses ranks, mesh dim 1); ``R = W / U`` ring ranks.
        layout: the ring's layout, ``"zigzag"`` or ``"contiguous"`` (Ulysses inside a hybrid is contiguous).

    Returns:
        A :class:`CPPrediction` of the slowest rank, its time split into compute, link, memory, overhead.

    Example::

        hw = CPHardware.calibrated(AttentionSpec(1, 16, 131072, 128, causal=True, dtype=torch.bfloat16), 468.7)
        predict_cp_time(AttentionSpec(1, 16, 32768, 128, causal=True, dtype=torch.bfloat16), "ring", 4, hw).total_ms
    """
    check_type(spec, AttentionSpec, "spec")
    check_type(hardware, CPHardware, "hardware")
    check_arg(method in CP_METHODS, "method", f"one of {CP_METHODS}", method)
    check_arg(isinstance(world_size, int) and world_size >= 1, "world_size", "an int >= 1", world_size)
    check_arg(spec.seq_kv == spec.seq_q, "spec.seq_kv", f"seq_q={spec.seq_q} (self-attention over the sharded sequence)", spec.seq_kv)
    check_arg(layout in LAYOUTS, "layout", f"one of {LAYOUTS}", layout)
    if method == "hybrid":
        check_arg(
            isinstance(ulysses_size, int) and ulysses_size >= 1 and world_size % ulysses_size == 0, "ulysses_size",
            f"an int dividing world_size={world_size} (U of the U x R mesh)", ulysses_size,
        )
    else:
        check_arg(ulysses_size is None, "ulysses_size", f"None for method={method!r} (only a hybrid has one)", ulysses_size)
    if method == "ring":
        tally = _ring(spec, world_size, hardware, layout)
    elif method == "ulysses":
        tally = _ulysses(spec, world_size, hardware)
    else:
        ring_size = world_size // ulysses_size
        _check_heads(spec, ulysses_size)
        heads = _heads_after_exchange(spec, ulysses_size)
        tally = _ring(heads, ring_size, hardware, layout).add(_exchanges(spec, ulysses_size, world_size, hardware, packed=False))
    return CPPrediction(
        method=method, world_size=world_size, total_ms=1e3 * tally.total, compute_ms=1e3 * tally.compute, link_ms=1e3 * tally.link,
        hidden_ms=1e3 * tally.hidden, memory_ms=1e3 * tally.memory, overhead_ms=1e3 * tally.overhead, link_bytes=tally.link_bytes,
        flops=tally.flops, ulysses_size=ulysses_size if method == "hybrid" else None, hardware=hardware.name,
    )


# ---------------------------------------------------------------- ring


def _ring_pieces(causal: bool, layout: str, rank: int, source: int, seq_local: int) -> tuple[int, int, bool, bool] | None:
    """``(query rows, key rows, causal, keys copied)`` of the one kernel rank ``rank`` runs on the K/V
    of rank ``source``, or None (no kernel); the closed form of ``schedule.ring_schedule`` without
    window or documents."""
    if not causal:
        return seq_local, seq_local, False, False
    if source == rank:
        return seq_local, seq_local, True, False
    if layout == "contiguous":
        return (seq_local, seq_local, False, False) if source < rank else None
    half = seq_local // 2
    # zigzag: both query chunks after the early key chunk (a half-block copy of K and V), or the late query chunk after both
    return (seq_local, half, False, True) if source < rank else (half, seq_local, False, False)


def _ring(spec: AttentionSpec, world_size: int, hw: CPHardware, layout: str) -> _Tally:
    """The slowest rank of ``ring_attention`` over ``world_size`` ranks of ``spec``'s global sequence."""
    check_layout(layout, spec.seq_q, world_size, "spec.seq_q")
    seq_local = spec.seq_q // world_size
    elt = spec.dtype.itemsize
    acc = torch.promote_types(spec.dtype, torch.float32).itemsize
    batch, heads_q, heads_kv, dim, dim_v = spec.batch, spec.heads_q, spec.heads_kv, spec.head_dim, spec.head_dim_v
    kv_bytes = batch * heads_kv * seq_local * (dim + dim_v) * elt  # one K/V block in the input dtype

    def travel_bytes(after_step: int) -> int:
        """dK/dV sums sent after ``after_step``: one share (step 1) in the input dtype, more in float32."""
        return batch * heads_kv * seq_local * (dim + dim_v) * (elt if after_step == 1 else acc)

    # accumulators zero-filled (out, dq, dk, dv) and cast once at the end
    setup = (batch * heads_q * seq_local * (dim + dim_v) + batch * heads_kv * seq_local * (dim + dim_v)) * (2 * acc + elt)
    slowest = _Tally()
    for rank in range(world_size):
        tally = _Tally(memory=setup / (hw.memory_gbs * 1e9))
        for step in range(world_size):
            piece = _ring_pieces(spec.causal, layout, rank, (rank - step) % world_size, seq_local)
            flops = compute = 0.0
            memory = (0.0, 0.0)  # bytes of the forward and the backward step's memory-bound passes
            if piece is not None:
                rows, keys, causal, copied = piece
                block = AttentionSpec(batch, heads_q, rows, dim, heads_kv=heads_kv, seq_kv=keys, head_dim_v=dim_v, causal=causal, dtype=spec.dtype)
                flops = block.flops()
                compute = flops / hw.attention_rate(keys)
                copy = 2 * batch * heads_kv * keys * (dim + dim_v) * elt if copied else 0  # read + write of the half K/V
                merge = batch * heads_q * rows * dim_v * (4 * acc + elt)  # out *= w (read, write); out += part * w (read both, write)
                sums = (batch * heads_q * rows * dim + batch * heads_kv * keys * (dim + dim_v)) * (2 * acc + elt)  # dq, dk, dv +=
                memory = (copy + merge, copy + sums)
            last = step == world_size - 1
            forward_link = 0 if last else kv_bytes  # the next K/V block
            backward_link = (0 if last else kv_bytes) + (travel_bytes(step - 1) if step > 1 else 0)  # ... and the previous step's dK/dV sums
            for factor, link, passes in ((1.0, forward_link, memory[0]), (_BACKWARD, backward_link, memory[1])):
                seconds, link_s = factor * compute, link / (hw.link_gbs * 1e9)
                tally = tally.add(_Tally(
                    compute=seconds, link=link_s, hidden=hw.overlap * min(seconds, link_s), memory=passes / (hw.memory_gbs * 1e9),
                    overhead=1e-6 * hw.step_overhead_us, link_bytes=link, flops=factor * flops,
                ))
        if world_size > 1:  # the last dK/dV sums come home after the last step, with nothing left to hide them
            home = travel_bytes(world_size - 1)
            tally = tally.add(_Tally(link=home / (hw.link_gbs * 1e9), link_bytes=home))
        slowest = max(slowest, tally, key=lambda t: t.total)
    return slowest


# ---------------------------------------------------------------- Ulysses


def _check_heads(spec: AttentionSpec, size: int) -> None:
    check_arg(spec.heads_q % size == 0, "spec.heads_q", f"a multiple of the {size} Ulysses ranks", spec.heads_q, "Use the ring.")
    check_arg(spec.heads_kv % size == 0 or size % spec.heads_kv == 0, "spec.heads_kv", f"a multiple or a divisor of the {size} Ulysses ranks", spec.heads_kv)


def _kv_heads_sent(spec: AttentionSpec, size: int) -> int:
    """KV heads a rank sends: all, or one per peer when there are fewer KV heads than ranks."""
    return spec.heads_kv if spec.heads_kv % size == 0 else size


def _heads_after_exchange(spec: AttentionSpec, size: int) -> AttentionSpec:
    """The global call one rank runs after the exchange: ``Hq / U`` query heads, their KV heads, all tokens."""
    return AttentionSpec(
        spec.batch, spec.heads_q // size, spec.seq_q, spec.head_dim, heads_kv=_kv_heads_sent(spec, size) // size,
        head_dim_v=spec.head_dim_v, causal=spec.causal, dtype=spec.dtype,
    )


def _exchanges(spec: AttentionSpec, size: int, world_size: int, hw: CPHardware, *, packed: bool) -> _Tally:
    """The all-to-alls over ``size`` ranks of one rank holding ``S / world_size`` tokens.

    ``packed`` (``ulysses_attention``): q/k/v in one exchange, out back, grad_out in, dq/dk/dv back in
    one, no lse. Otherwise (the hybrid's ``_exchange``): one exchange per tensor, lse included.
    """
    tokens = spec.batch * spec.seq_q // world_size
    q = tokens * spec.heads_q * spec.head_dim * spec.dtype.itemsize
    o = tokens * spec.heads_q * spec.head_dim_v * spec.dtype.itemsize
    k = tokens * _kv_heads_sent(spec, size) * spec.head_dim * spec.dtype.itemsize
    lse = tokens * spec.heads_q * torch.promote_types(spec.dtype, torch.float32).itemsize
    v = tokens * _kv_heads_sent(spec, size) * spec.head_dim_v * spec.dtype.itemsize
    # forward: q, k, v to head shards, out (and lse) back; backward: grad_out to head shards, dq, dk, dv back
    tensors = [q, k, v, o, o, q, k, v] if packed else [q, k, v, o, lse, o, q, k, v]
    sent = sum(tensors) * (size - 1) / size
    return _Tally(
        link=sent / (hw.link_gbs * 1e9),
        link_bytes=sent,
        memory=4 * sum(tensors) / (hw.memory_gbs * 1e9),  # two reorder copies (read + write) per tensor
        overhead=(4 if packed else len(tensors)) * 1e-6 * hw.step_overhead_us,
    )


def _ulysses(spec: AttentionSpec, world_size: int, hw: CPHardware) -> _Tally:
    _check_heads(spec, world_size)
    local = _heads_after_exchange(spec, world_size)
    flops = local.flops(backward=True)
    return _Tally(compute=flops / hw.attention_rate(spec.seq_kv), flops=flops).add(_exchanges(spec, world_size, world_size, hw, packed=True))
