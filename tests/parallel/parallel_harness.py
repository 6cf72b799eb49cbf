"""Run context-parallel attention on spawned gloo ranks and compare it with a float64 reference.

``spawn`` starts one process per rank, gives the group a 60 s timeout and kills every rank when the
whole run passes its deadline, so a failing or hanging rank fails the test instead of hanging it.
``run_cases`` (the rank's body) builds each case's seeded global inputs, shards them with the
layout helpers, runs forward and backward, and returns the shards; ``errors`` joins them with
``layout.unshard`` and measures them against ``reference`` and against the single-process kernel.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import cache
from dataclasses import dataclass

import torch
import torch.distributed as dist

from attnkit.ops.kernels import backward_from_lse, forward_with_lse
from torch.distributed.device_mesh import init_device_mesh

from attnkit.parallel import allgather_attention, hybrid_attention, ring_attention, ulysses_attention
from attnkit.parallel.layout import shard, shard_hybrid, unshard, unshard_hybrid
from rank_spawn import spawn  # noqa: F401  (re-exported: the parallel tests import it from here)

METHODS = {"ring": ring_attention, "allgather": allgather_attention, "ulysses": ulysses_attention, "hybrid": hybrid_attention}
TENSORS = ("out", "lse", "dq", "dk", "dv")


@dataclass(frozen=True)
class Case:
    """One context-parallel call on a seeded global input ``(B, H, S, D)``."""

    method: str = "ring"
    layout: str = "zigzag"
    causal: bool = True
    dtype: torch.dtype = torch.float64
    batch: int = 1
    heads: int = 4
    heads_kv: int = 4
    seq: int = 48
    """Global sequence length (a multiple of 2W for zigzag)."""
    dim: int = 8
    dim_v: int | None = None
    mesh: tuple[int, int] | None = None
    """``(ring, ulysses)`` sizes for ``method="hybrid"``."""
    window: int | None = None
    """Causal sliding window in tokens (ring only)."""
    documents: tuple[int, ...] | None = None
    """Packed document lengths summing to ``seq`` (ring only)."""
    head_chunks: int | None = None
    """Ulysses head groups pipelined with the kernels (None: the default)."""
    fault: str | None = None
    """A planted bug (see ``_planted``) that the comparison must catch."""
    seed: int = 0
    device: str = "cpu"
    """``"cuda"``: each rank runs on its GPU (NCCL ranks); the reference stays float64 on the CPU."""

    def name(self) -> str:
        parts = [self.method + (f"{self.mesh[0]}x{self.mesh[1]}" if self.mesh else ""), self.layout, "causal" if self.causal else "full", str(self.dtype).removeprefix("torch.")]
        parts += [f"B{self.batch}", f"H{self.heads}kv{self.heads_kv}", f"S{self.seq}", f"D{self.dim}"]
        parts += ([f"Dv{self.dim_v}"] if self.dim_v else []) + ([f"fault={self.fault}"] if self.fault else [])
        parts += [f"chunks{self.head_chunks}"] if self.head_chunks else []
        parts += ([f"window{self.window}"] if self.window else []) + ([f"docs{'+'.join(map(str, self.documents))}"] if self.documents else [])
        return "-".join(parts)

    def shard(self, x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        """Rank ``rank``'s shard of the sequence ``x`` (B, H, S, ...) in this case's layout."""
        if self.mesh is None:
            return shard(x, rank, world_size, layout=self.layout)
        ring, ulysses = self.mesh
        return shard_hybrid(x, rank // ulysses, ring, rank % ulysses, ulysses, layout=self.layout)

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        return unshard(shards, layout=self.layout) if self.mesh is None else unshard_hybrid(shards, self.mesh[0], layout=self.layout)

    def inputs(self) -> dict[str, torch.Tensor]:
        """Global float64 inputs and output gradients (the same on every rank and world size: one seed)."""
        generator = torch.Generator().manual_seed(self.seed)
        seq, dim_v = self.seq, self.dim_v or self.dim

        def randn(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float64)

        return {
            "q": randn(self.batch, self.heads, seq, self.dim),
            "k": randn(self.batch, self.heads_kv, seq, self.dim),
            "v": randn(self.batch, self.heads_kv, seq, dim_v),
            "grad_out": randn(self.batch, self.heads, seq, dim_v),
            "grad_lse": randn(self.batch, self.heads, seq),
        }

    def document_ids(self) -> torch.Tensor | None:
        """``(1, S)`` int64 document id of every position, or None."""
        if self.documents is None:
            return None
        assert sum(self.documents) == self.seq, self.documents
        return torch.repeat_interleave(torch.arange(len(self.documents)), torch.tensor(self.documents)).unsqueeze(0)

    def mask(self) -> torch.Tensor | None:
        """The whole sequence's bool mask ``(1, 1, S, S)`` beyond causal (window, documents), or None."""
        if self.window is None and self.documents is None:
            return None
        positions = torch.arange(self.seq)
        allowed = torch.ones(self.seq, self.seq, dtype=torch.bool)
        if self.window is not None:
            allowed &= positions.unsqueeze(1) - positions < self.window
        if self.documents is not None:
            ids = self.document_ids()[0]
            allowed &= ids.unsqueeze(1) == ids
        return allowed[None, None]


# ---------------------------------------------------------------- spawning ranks: rank_spawn.spawn


# ---------------------------------------------------------------- a rank's work


def run_cases(rank: int, world_size: int, cases: list[Case]) -> list[dict[str, torch.Tensor]]:
    """This rank's shards of out, lse, dq, dk, dv for every case."""
    return [_run_case(rank, world_size, case) for case in cases]


def _device(case: Case) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if case.device == "cuda" else torch.device("cpu")


def _run_case(rank: int, world_size: int, case: Case) -> dict[str, torch.Tensor]:
    device = _device(case)
    inputs = {name: case.shard(x, rank, world_size).to(device) for name, x in case.inputs().items()}
    q, k, v = (inputs[name].to(case.dtype).requires_grad_(True) for name in "qkv")
    where = {"group": None} if case.mesh is None else {"mesh": _mesh(case.mesh, device.type)}
    if case.head_chunks is not None:
        where["head_chunks"] = case.head_chunks
    if case.window is not None:
        where["window"] = case.window
    if case.documents is not None:
        where["document_ids"] = shard(case.document_ids(), rank, world_size, layout=case.layout, dim=1).to(device)
    with _planted(case.fault), _counted() as calls:
        out, lse = METHODS[case.method](q, k, v, causal=case.causal, layout=case.layout, return_lse=True, **where)
        loss = (out.double() * inputs["grad_out"]).sum() + (lse.double() * inputs["grad_lse"]).sum()
        loss.backward()
    result = {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    return {**{name: t.detach().cpu() for name, t in result.items()}, "kernel_calls": calls[0]}


@contextmanager
def _counted():
    """Count the ring's block forward calls (the work its schedule did not skip)."""
    import attnkit.parallel.ring as ring

    calls, original = [0], ring.forward_with_lse

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    ring.forward_with_lse = counting
    try:
        yield calls
    finally:
        ring.forward_with_lse = original


@cache
def _mesh(shape: tuple[int, int], device_type: str = "cpu"):
    return init_device_mesh(device_type, shape, mesh_dim_names=("ring", "ulysses"))


@contextmanager
def _planted(fault: str | None):
    """Temporarily break the ring in one of the ways a plausible implementation goes wrong."""
    import attnkit.parallel.ring as ring
    import attnkit.parallel.schedule as schedule

    if fault is None:
        yield
        return
    saved = ring.merge_partials, schedule._unmasked
    if fault == "average":  # average partial outputs instead of weighting them by their lse
        ring.merge_partials = lambda a, la, b, lb: ((a.float() + b.float()) / 2, torch.logaddexp(la.float(), lb.float()))
    elif fault == "zigzag_order":  # pair each query half with the wrong key half
        original = saved[1]

        def swapped(layout, causal, rank, source, seq_local):
            return [p if p.causal or p.keys == slice(None) else p._replace(keys=slice(seq_local // 2, None)) for p in original(layout, causal, rank, source, seq_local)]

        schedule._unmasked = swapped
    else:
        raise ValueError(fault)
    try:
        yield
    finally:
        ring.merge_partials, schedule._unmasked = saved


# ---------------------------------------------------------------- checking


def reference(case: Case) -> dict[str, torch.Tensor]:
    """out, lse, dq, dk, dv of the whole sequence in float64 by the explicit formula."""
    inputs = case.inputs()
    q, k, v = (inputs[name].clone().requires_grad_(True) for name in "qkv")
    group = case.heads // case.heads_kv
    scores = q @ k.repeat_interleave(group, dim=1).transpose(-2, -1) / math.sqrt(case.dim)
    if case.causal:
        seq = q.shape[2]
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    if case.mask() is not None:
        scores = scores.masked_fill(~case.mask(), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ v.repeat_interleave(group, dim=1)
    ((out * inputs["grad_out"]).sum() + (lse * inputs["grad_lse"]).sum()).backward()
    return {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def single_process(case: Case) -> dict[str, torch.Tensor]:
    """The same tensors from the single-process kernels (``ops.kernels``) in the case's dtype, on its device."""
    inputs, device = case.inputs(), _device(case)
    mask = None if case.mask() is None else case.mask().to(device)
    q, k, v, grad_out = (inputs[name].to(device, case.dtype) for name in ("q", "k", "v", "grad_out"))
    out, lse = forward_with_lse(q, k, v, causal=case.causal, mask=mask)
    grad_lse = inputs["grad_lse"].to(device, lse.dtype)
    dq, dk, dv = backward_from_lse(grad_out, q, k, v, out, lse, causal=case.causal, grad_lse=grad_lse, mask=mask)
    return {name: t.cpu() for name, t in {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}.items()}


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |x - ref| / max |ref|`` in float64."""
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


def rms_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in float64: steadier than the max for comparing error sizes."""
    return ((x.double() - ref).norm() / ref.norm()).item()


def errors(case: Case, shards: list[dict[str, torch.Tensor]], measure=None) -> dict[str, tuple[float, float]]:
    """Per tensor: (error of the joined shards, error of the single-process kernel), both against the
    float64 reference by ``measure`` (default :func:`relative_error`)."""
    measure = measure or relative_error
    ref, single = reference(case), single_process(case)
    joined = {name: case.unshard([s[name].detach() for s in shards]) for name in TENSORS}
    return {name: (measure(joined[name], ref[name]), measure(single[name], ref[name])) for name in TENSORS}
