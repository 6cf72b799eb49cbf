"""Ring, all-gather, Ulysses and hybrid attention on 2, 4 and 8 gloo ranks equal single-process attention.

Each world size spawns its ranks once and runs every case there (``parallel_harness``). Every
case is one seeded global input; each rank gets its shard through ``layout.shard`` and the joined
out, lse, dq, dk, dv are compared with the float64 explicit formula. Masked cases (sliding window,
packed documents of odd lengths) run the ring on global positions; the blocks their masks empty
must not reach the kernel (``kernel_calls`` against ``ring_schedule``).

Tolerance per tensor: ``max(K * e_single, FLOOR)``, where ``e_single`` is the error of the
single-process kernel (``ops.kernels``) in the same dtype on the same input. K = 2 for float32 and
float64 (the ring merges W partials and sums W gradient blocks in a different order), K = 3 for
bfloat16 (a max-norm error of one element; the RMS bound in ``test_bf16_error_matches_single_process``
is 1.2x). FLOOR for float64 is 1e-10: ``forward_with_lse`` and ``merge_partials`` carry the
log-sum-exp in float64 for float64 inputs.
"""

from __future__ import annotations

import time
from functools import cache

import pytest
import torch
import torch.distributed as dist

from attnkit.errors import InvalidArgumentError, UnsupportedError
from attnkit.parallel import RingComm, ring_attention, ulysses_attention
from attnkit.parallel.layout import shard_positions
from attnkit.parallel import schedule as schedule_mod
from attnkit.parallel.schedule import ring_schedule
from parallel_harness import TENSORS, Case, errors, rms_error, run_cases, spawn

bf16, f32 = torch.bfloat16, torch.float32


_FLOOR = {torch.float64: 1e-10, f32: 1e-6, bf16: 1e-3}
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
    Case(method="ulysses", heads=16, heads_kv=16, head_chunks=2),  # exchanges pipelined over 2 head groups
]
# Ulysses head groups that split evenly only at some world sizes.
_CHUNKED = {
    2: [Case(method="ulysses", heads=8, heads_kv=8, head_chunks=4, causal=False), Case(method="ulysses", heads=8, heads_kv=4, head_chunks=2, dim=5),
        Case(method="ulysses", heads=8, heads_kv=8, head_chunks=2, dtype=bf16, dim=16, seq=64, layout="contiguous")],
    4: [Case(method="ulysses", heads=8, heads_kv=8, head_chunks=2, layout="contiguous")],
}
# Masks on global positions (ring): sliding windows that skip blocks, packed documents of any lengths.
_MASKED = [
    Case(window=5),
    Case(window=13, heads=4, heads_kv=2, dim=5),
    Case(window=9, layout="contiguous"),
    Case(documents=(7, 20, 3, 18)),
    Case(documents=(7, 20, 3, 18), causal=False, layout="contiguous"),
    Case(documents=(1, 30, 17), window=6, heads=4, heads_kv=1),
    Case(documents=(25, 39), window=11, dtype=bf16, dim=16, seq=64),
    Case(documents=(6,) * 8),  # no document crosses ranks at W=2, 4 (one ring step, nothing travels); does at W=8
    Case(documents=(12,) * 4, causal=False, layout="contiguous", dtype=bf16, dim=16),
    # Ulysses runs the same masks as a sparsity pattern on whole sequences after its exchange
    Case(method="ulysses", window=5),
    Case(method="ulysses", documents=(7, 20, 3, 18), causal=False, layout="contiguous"),
    Case(method="ulysses", documents=(16, 16, 16), heads=4, heads_kv=2),
    Case(method="ulysses", documents=(1, 30, 17), window=6, heads=4, heads_kv=4),
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
    2: _GRID + _VARIANTS + _CHUNKED[2] + _MASKED + _hybrid((2, 1), (1, 2)),
    4: _GRID + _VARIANTS + _CHUNKED[4] + _MASKED + _hybrid((2, 2)),
    8: [c for c in _GRID + _VARIANTS + _MASKED if c.method != "ulysses" or c.heads % (8 * (c.head_chunks or 1)) == 0] + _hybrid((2, 4), (4, 2)),
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
    # Masked Ulysses runs attnkit.sparse after its exchange, whose lse is float32 by the op's contract:
    # lse, and dq/dk through lse's gradient, are then float32-exact (~1e-8), out and dv float64-exact.
    floor = 1e-7 if case.method == "ulysses" and (case.window or case.documents) and case.dtype == torch.float64 else _FLOOR[case.dtype]
    for name, (error, single) in errors(case, shards[index]).items():
        tolerance = max(_K[case.dtype] * single, floor)
        assert error <= tolerance, f"{case.name()} at W={world_size}: {name} error {error:.2e} > {tolerance:.2e} (single process {single:.2e})"


@pytest.mark.parametrize("world_size", [2, 4])
def test_masked_ring_runs_exactly_the_scheduled_blocks(world_size):
    """Every masked case called the kernel once per scheduled piece, and windows skipped work."""
    cases, shards = _shards(world_size)
    for index, case in enumerate(cases):
        if case.method != "ring" or (case.window is None and case.documents is None):
            continue
        for rank, result in enumerate(shards[index]):
            schedule = ring_schedule(case.seq, world_size, rank, layout=case.layout, causal=case.causal, window=case.window, documents=case.document_ids())
            assert result["kernel_calls"] == sum(map(len, schedule)), f"{case.name()} rank {rank}"


def _area(piece, seq_local: int) -> float:
    """Query-key pairs a piece's kernel computes (half its rectangle for a causal diagonal)."""
    size = len(range(seq_local)[piece.rows]) * len(range(seq_local)[piece.keys])
    return size / 2 if piece.causal else size


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("window, documents, causal", [
    (5, None, True), (None, (7, 20, 3, 18), True), (None, (7, 20, 3, 18), False), (6, (1, 30, 17), True),
    (None, (1,) * 48, True),  # many short documents: pairs past MAX_RUN_PIECES become one bool-mask piece
])  # fmt: skip
def test_schedule_is_the_mask_and_skips_empty_blocks(layout, window, documents, causal, monkeypatch):
    """Joined over ranks and steps, the schedule's pieces are exactly the dense mask, no query-key pair
    twice; the work a window or documents empty is not scheduled (less kernel area than plain causal);
    packed documents without a window run as dense per-document rectangles (no mask)."""
    monkeypatch.setattr(schedule_mod, "MAX_RUN_PIECES", 3)
    seq, world_size = 48, 4
    case = Case(layout=layout, window=window, documents=documents, causal=causal)
    ids = case.document_ids()
    dense = case.mask()[0, 0] & (torch.ones(seq, seq, dtype=torch.bool).tril() if causal else True)
    area, full_area, masked = 0, 0, 0
    for rank in range(world_size):
        positions = shard_positions(seq, world_size, rank, layout)
        covered = torch.zeros(seq // world_size, seq, dtype=torch.bool)
        for step, step_pieces in enumerate(ring_schedule(seq, world_size, rank, layout=layout, causal=causal, window=window, documents=ids)):
            keys = shard_positions(seq, world_size, (rank - step) % world_size, layout)
            for piece in step_pieces:
                rows, cols = positions[piece.rows], keys[piece.keys]
                block = torch.ones(len(rows), len(cols), dtype=torch.bool)
                block = block.tril() if piece.causal else block
                block = block if piece.mask is None else block & piece.mask[0, 0]
                assert block.any(), "an empty piece was scheduled"
                assert not covered[piece.rows][:, cols].any(), "a key pair scheduled twice"
                covered[piece.rows.start or 0 : piece.rows.stop, cols] = block
                area += _area(piece, seq // world_size)
                masked += piece.mask is not None
        one_document = torch.zeros(1, seq, dtype=torch.long)  # nothing masked but causality
        for step_pieces in ring_schedule(seq, world_size, rank, layout=layout, causal=causal, documents=one_document):
            full_area += sum(_area(p, seq // world_size) for p in step_pieces)
        assert torch.equal(covered, dense[positions]), f"rank {rank}"
    assert area < full_area, (area, full_area)  # blocks outside every window/document skipped
    if window is None:  # documents alone: rectangles, except the pairs with more than MAX_RUN_PIECES documents
        assert (masked > 0) == (len(documents) > 20), masked


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_documents_within_ranks_take_one_step(layout):
    """Packed documents that never cross from one rank's chunk to another's: one step on every rank (the
    ring moves nothing); one token more in the first document and every rank runs all W steps."""
    seq = 48
    for world_size in (2, 4):
        aligned = torch.repeat_interleave(torch.arange(8), torch.tensor((6,) * 8)).unsqueeze(0)
        shifted = torch.repeat_interleave(torch.arange(8), torch.tensor((7,) + (6,) * 6 + (5,))).unsqueeze(0)
        for rank in range(world_size):
            assert len(ring_schedule(seq, world_size, rank, layout=layout, causal=True, documents=aligned)) == 1
            assert len(ring_schedule(seq, world_size, rank, layout=layout, causal=True, documents=shifted)) == world_size


def test_a_window_without_causal_raises():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(UnsupportedError, match="window: a sliding window needs causal=True"):
        ring_attention(q, q, q, causal=False, window=2)
    with pytest.raises(InvalidArgumentError, match="window"):
        ring_attention(q, q, q, causal=True, window=0)


@pytest.mark.parametrize("world_size", [4])
def test_bf16_error_matches_single_process(world_size):
    """bf16 out/dq/dk/dv RMS error against float64 at 4 ranks is at most 1.2x the single-process
    kernel's (per-block grads reach the float32 accumulators unrounded)."""
    cases, shards = _shards(world_size)
    case = next(c for c in _GROWTH if c.dtype == bf16)
    measured = errors(case, shards[cases.index(case)], measure=rms_error)
    ratios = {name: ring / single for name, (ring, single) in measured.items()}
    assert max(ratios.values()) <= 1.2, {name: round(r, 3) for name, r in ratios.items()}


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
        "head_chunks": raised(lambda: ulysses_attention(tensor(1, 4, 6, 8), tensor(1, 4, 6, 8), tensor(1, 4, 6, 8), head_chunks=4)),
        "masked_chunks": raised(lambda: ulysses_attention(*(tensor(1, 4, 6, 8),) * 3, causal=True, window=3, head_chunks=2)),
        "ulysses_packings": raised(lambda: ulysses_attention(*(tensor(2, 2, 6, 8),) * 3, causal=True,
                                                            document_ids=torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]]))),
        "window_differs": raised(lambda: ring_attention(q, q, q, causal=True, window=3 + rank)),
        "scale_differs": raised(lambda: ring_attention(q, q, q, causal=True, scale=0.5 + rank)),
        "dtype_differs": raised(lambda: ring_attention(*(q.float() if rank else q,) * 3, causal=True)),
        "scale_nan": raised(lambda: ring_attention(q, q, q, scale=float("nan"))),
        "documents_shape": raised(lambda: ring_attention(q, q, q, causal=True, document_ids=torch.zeros(1, 5, dtype=torch.long))),
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
        "head_chunks": "head_chunks: expected a divisor of 4 query heads / 2 ranks, got 4",
        "masked_chunks": "head_chunks: expected 1 with a window or document_ids, got 2",
        "ulysses_packings": "document_ids: ulysses_attention runs one packing for the whole batch",
        "window_differs": "window on rank 1: expected 3, as on rank 0, got 4",
        "scale_differs": "scale (float64 bits) on rank 1",
        "dtype_differs": "q.dtype on rank 1",
        "scale_nan": "scale: expected a finite positive number",
        "documents_shape": "document_ids: expected an int tensor (B or 1, S_local) = (1, 6)",
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
