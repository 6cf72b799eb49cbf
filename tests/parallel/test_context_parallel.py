"""Ring, all-gather, Ulysses and hybrid attention on 2, 4 and 8 gloo ranks equal single-process attention.

Each world size spawns its ranks once and runs every case there (``parallel_harness``). Every
case is one seeded global input; each rank gets its shard through ``layout.shard`` and the joined
out, lse, dq, dk, dv are compared with the float64 explicit formula.

Tolerance per tensor: ``max(K * e_single, FLOOR)``, where ``e_single`` is the error of the
single-process kernel (``ops.kernels``) in the same dtype on the same input. K = 2 for float32 and
float64 (the ring merges W partials and sums W gradient blocks in a different order), K = 3 for
bfloat16 (each block's output and gradients are rounded to bf16 before the float32 merge, as with
any fused kernel). FLOOR for float64 follows the shared LSE contract: ``forward_with_lse`` and
``merge_partials`` carry the log-sum-exp in float32, which bounds float64 results to ~1e-7;
should they keep float64, the floor drops to 1e-10 by itself (``_FLOOR``).
"""

from __future__ import annotations

import time
from functools import cache

import pytest
import torch
import torch.distributed as dist

from attnkit.errors import InvalidArgumentError, UnsupportedError
from attnkit.ops.kernels import forward_with_lse
from attnkit.ops.lse import merge_partials
from attnkit.parallel import RingComm, ring_attention, ulysses_attention
from parallel_harness import TENSORS, Case, errors, rms_error, run_cases, spawn

bf16, f32 = torch.bfloat16, torch.float32


def _lse_keeps_float64() -> bool:
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    out, lse = forward_with_lse(x, x, x, causal=False)
    merged, merged_lse = merge_partials(out, lse, out, lse)
    return lse.dtype == merged.dtype == merged_lse.dtype == torch.float64


_FLOOR = {torch.float64: 1e-10 if _lse_keeps_float64() else 1e-6, f32: 1e-6, bf16: 1e-3}
_K = {torch.float64: 2.0, f32: 2.0, bf16: 3.0}

# Exact cases per world size: every method x layout x causal, then GQA/MQA, odd head dims and
# lengths, batch > 1, float32 and bfloat16. (Ulysses needs heads divisible by W.)
_GRID = [Case(method=m, layout=layout, causal=causal) for m in ("ring", "allgather", "ulysses") for layout in ("zigzag", "contiguous") for causal in (True, False)]
_VARIANTS = [
    Case(heads=4, heads_kv=2, dim=5, dim_v=7),  # GQA, odd head dims, Dv != D
    Case(layout="contiguous", heads=4, heads_kv=1, dim=3),  # MQA, contiguous
    Case(method="allgather", heads=4, heads_kv=2, dim=5, dim_v=7),
    Case(method="ulysses", heads=4, heads_kv=1, dim=5),  # fewer KV heads than ranks
    Case(method="ulysses", heads=8, heads_kv=4, layout="contiguous"),
    Case(batch=2, seq=80, heads=2, heads_kv=2, dim=16),  # chunks of odd length at W=8
    Case(dtype=f32, heads=4, heads_kv=2),
    Case(dtype=f32, layout="contiguous", causal=False),
    Case(dtype=bf16, dim=16, seq=64),
    Case(method="ulysses", dtype=bf16, dim=16, seq=64),
]
_FAULTS = [Case(fault="average"), Case(fault="zigzag_order"), Case(fault="average", causal=False, layout="contiguous")]
_GROWTH = [Case(dtype=dtype, seq=512, heads=4, dim=16, seed=7) for dtype in (bf16, f32)]

def _hybrid(*meshes):
    """Ulysses x ring on each (ring, ulysses) mesh: causal zigzag, contiguous, GQA, bf16."""
    cases = []
    for mesh in meshes:
        cases += [Case(method="hybrid", mesh=mesh), Case(method="hybrid", mesh=mesh, layout="contiguous", causal=False)]
        cases += [Case(method="hybrid", mesh=mesh, heads=8, heads_kv=2, dim=5), Case(method="hybrid", mesh=mesh, dtype=bf16, dim=16, seq=64)]
    return cases


CASES = {
    2: _GRID + _VARIANTS + _hybrid((2, 1), (1, 2)),
    4: _GRID + _VARIANTS + _hybrid((2, 2)),
    8: [c for c in _GRID + _VARIANTS if c.method != "ulysses" or c.heads % 8 == 0] + _hybrid((2, 4), (4, 2)),
}


@cache
def _shards(world_size: int) -> tuple[list[Case], list]:
    cases = CASES[world_size] + _FAULTS + _GROWTH
    per_rank = spawn(run_cases, world_size, cases)
    return cases, [[rank_results[i] for rank_results in per_rank] for i in range(len(cases))]


def _case_params():
    return [pytest.param(w, i, id=f"W{w}-{case.name()}", marks=[pytest.mark.slow] if w == 8 else []) for w in CASES for i, case in enumerate(CASES[w])]


@pytest.mark.parametrize("world_size, index", _case_params())
def test_equals_single_process_reference(world_size, index):
    cases, shards = _shards(world_size)
    case = cases[index]
    for name, (error, single) in errors(case, shards[index]).items():
        tolerance = max(_K[case.dtype] * single, _FLOOR[case.dtype])
        assert error <= tolerance, f"{case.name()} at W={world_size}: {name} error {error:.2e} > {tolerance:.2e} (single process {single:.2e})"


@pytest.mark.parametrize("world_size", [2, 4])
def test_planted_faults_are_caught(world_size):
    cases, shards = _shards(world_size)
    for index, case in enumerate(cases):
        if case.fault is None:
            continue
        worst = max(error / max(_K[case.dtype] * single, _FLOOR[case.dtype]) for error, single in errors(case, shards[index]).values())
        assert worst > 100, f"planted fault {case.fault!r} in {case.name()} went unnoticed (worst error/tolerance {worst:.1f})"


@pytest.mark.slow
def test_error_does_not_grow_with_world_size():
    """bf16/fp32 error (RMS, against float64) at 8 ranks is at most 1.2x the error at 2 ranks.

    An error below the dtype's unit roundoff counts as one unit: float32's lse is right to a
    fraction of an ulp at both sizes, where a ratio measures only which way the last bit rounded.
    """
    grown = {}
    for growth_case in _GROWTH:
        measured = {}
        for world_size in (2, 8):
            cases, shards = _shards(world_size)
            index = cases.index(growth_case)
            measured[world_size] = errors(growth_case, shards[index], measure=rms_error)
        unit = torch.finfo(growth_case.dtype).eps
        for name in TENSORS:
            grown[f"{growth_case.name()} {name}"] = max(measured[8][name][0], unit) / max(measured[2][name][0], unit)
    assert max(grown.values()) <= 1.2, {name: round(ratio, 3) for name, ratio in grown.items()}


# ---------------------------------------------------------------- bad input, misuse and hangs


def _bad_inputs(rank: int, world_size: int) -> dict[str, str]:
    """The message each bad call raises on this rank ('' if it did not raise)."""

    def raised(call) -> str:
        try:
            call()
        except (InvalidArgumentError, UnsupportedError, RuntimeError) as error:
            return f"{type(error).__name__}: {error}"
        return ""

    def tensor(*shape):
        return torch.randn(*shape, dtype=torch.float64)

    q = tensor(1, 4, 6, 8)
    ragged = tensor(1, 4, 6 + 2 * rank, 8)
    comm = RingComm()
    return {
        "ragged": raised(lambda: ring_attention(ragged, ragged, ragged, causal=True)),
        "odd_zigzag": raised(lambda: ring_attention(q[:, :, :3], q[:, :, :3], q[:, :, :3], causal=True)),
        "heads": raised(lambda: ring_attention(q, tensor(1, 3, 6, 8), tensor(1, 3, 6, 8))),
        "kv_length": raised(lambda: ring_attention(q, q[:, :, :4], q[:, :, :4])),
        "layout": raised(lambda: ring_attention(q, q, q, layout="striped")),
        "ulysses_heads": raised(lambda: ulysses_attention(tensor(1, 3, 6, 8), tensor(1, 3, 6, 8), tensor(1, 3, 6, 8))),
        "wait_first": raised(comm.wait),
        "commit_empty": raised(comm.commit),
    }


def test_bad_input_raises_naming_the_parameter_on_every_rank():
    messages = spawn(_bad_inputs, 2)
    expected = {
        "ragged": "q.shape[2] (local sequence length) on rank 1: expected 6, as on rank 0, got 8",
        "odd_zigzag": "S = q.shape[2] * world_size: expected a multiple of 4 (2 x 2 ranks) for layout 'zigzag', got 6",
        "heads": "k: expected a number of KV heads dividing q's 4 heads (GQA), got 3",
        "kv_length": "k, v: expected the local sequence length 6 of q",
        "layout": "layout: expected one of ('zigzag', 'contiguous'), got 'striped'",
        "ulysses_heads": "q.shape[1] (query heads): expected a multiple of the 2 ranks for Ulysses, got 3",
        "wait_first": "RuntimeError: RingComm.wait: called before commit()",
        "commit_empty": "RuntimeError: RingComm.commit: nothing queued",
    }
    for rank, got in enumerate(messages):
        for name, fragment in expected.items():
            assert fragment in got[name], f"rank {rank}, {name}: {got[name]!r}"


def test_without_process_group_raises_unsupported():
    assert not dist.is_initialized()
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(UnsupportedError, match="init_process_group"):
        ring_attention(q, q, q)


def _one_rank_hangs(rank: int, world_size: int) -> None:
    if rank == 1:
        time.sleep(600)
    q = torch.randn(1, 2, 4, 8)
    ring_attention(q, q, q)


def test_a_hanging_rank_fails_the_test_within_the_timeout():
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="did not finish within 3 s"):
        spawn(_one_rank_hangs, 2, timeout=3)
    assert time.monotonic() - start < 20
