"""BlockMask construction from block states (``sparse/blocks.py``): the sort-free tables equal, bit
for bit, those of the construction they replaced (an argsort per row, then torch's
``BlockMask.from_kv_blocks``) and of ``create_block_mask``; a new shape builds with no sort and no
host sync (CUDA: sync debug mode; timing on the GPU); the compiled build (CUDA's path, compiled here
on CPU) equals the eager one and compiles once for all lengths."""

from __future__ import annotations

import statistics
import time
import warnings

import pytest
import torch
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.profiler import ProfilerActivity, profile

from attnkit.ops.cache import clear_caches
from attnkit.sparse import EMPTY, FULL, PARTIAL, Causal, ContentAware, Documents, SlidingWindow, select_blocks
from attnkit.sparse.blocks import UNKNOWN, Grid, block_mask_from_states, block_tables, compiled, on_device
from attnkit.sparse import patterns
from attnkit.sparse.patterns import _exact_tables, _structure, _tables_of

_TABLES = ["kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"]


def _reference(states: torch.Tensor, grid: Grid, mask_mod) -> BlockMask:
    """The construction before the sort-free one: a stable descending argsort of each 0/1 row (what
    create_block_mask does), then torch derives the query-side tables (another sort) in from_kv_blocks."""

    def ordered(table):
        table = table.to(torch.int32)
        return table.sum(-1, dtype=torch.int32), torch.argsort(table, dim=-1, descending=True, stable=True).to(torch.int32)

    partial, partial_idx = ordered(states == PARTIAL)
    full, full_idx = ordered(states == FULL)
    return BlockMask.from_kv_blocks(partial, partial_idx, full, full_idx, BLOCK_SIZE=(grid.block_q, grid.block_kv),
                                    mask_mod=mask_mod, seq_lengths=(grid.q_len, grid.kv_len))  # fmt: skip


def _assert_same_tables(mine: BlockMask, theirs: BlockMask) -> None:
    for name in _TABLES:
        a, b = getattr(mine, name), getattr(theirs, name)
        assert a.dtype == b.dtype == torch.int32 and a.is_contiguous(), name
        assert torch.equal(a, b), name
    assert mine.seq_lengths == theirs.seq_lengths and mine.BLOCK_SIZE == theirs.BLOCK_SIZE


@pytest.mark.parametrize("shape", [(1, 1, 9, 9), (2, 3, 5, 7), (1, 2, 12, 4), (1, 1, 1, 6)], ids=str)
def test_tables_equal_the_argsort_construction_on_random_states(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    for density in (0.0, 0.3, 1.0):  # empty rows, mixed rows, rows with no EMPTY block
        states = torch.where(torch.rand(shape, generator=generator) < density, torch.randint(PARTIAL, FULL + 1, shape, generator=generator), EMPTY).to(torch.int8)
        grid = Grid(shape[2] * 16 - 5, shape[3] * 16 - 3, 16, 16, torch.device("cpu"))
        mask_mod = lambda b, h, q_idx, kv_idx: kv_idx <= q_idx  # noqa: E731  (any mask_mod: the tables come from the states)
        _assert_same_tables(block_mask_from_states(states, grid, mask_mod), _reference(states, grid, mask_mod))


@pytest.mark.parametrize("length", [200, 256])
def test_a_per_head_selection_equals_create_block_mask(length):
    """Batched per-head states (a content-aware selection, cut blocks at 200) vs torch's construction from elements."""
    generator = torch.Generator().manual_seed(length)
    q, k = torch.randn(2, 3, length, 16, generator=generator), torch.randn(2, 3, length, 16, generator=generator)
    selection = select_blocks(q, k, ContentAware(block_size=32, density=0.4))
    dense = selection.blocks.repeat_interleave(32, -2).repeat_interleave(32, -1)[..., :length, :length] & Causal().to_dense(length)
    theirs = create_block_mask(lambda b, h, q_idx, kv_idx: dense[b, h, q_idx, kv_idx], 2, 3, length, length, device="cpu", BLOCK_SIZE=32)
    mine = selection.block_mask()
    _assert_same_tables(mine, theirs)
    _assert_same_tables(mine, _reference(torch.where(selection.blocks, selection.base_states, EMPTY).to(torch.int8), selection.grid, mine.mask_mod))


def test_an_unrefined_unknown_block_runs_as_partial():
    states = torch.tensor([[[[PARTIAL, UNKNOWN, EMPTY], [FULL, UNKNOWN, PARTIAL]]]], dtype=torch.int8)
    grid = Grid(32, 48, 16, 16, torch.device("cpu"))
    mask_mod = Causal().mask_mod(32, 48)
    _assert_same_tables(block_mask_from_states(states, grid, mask_mod), _reference(torch.where(states == UNKNOWN, PARTIAL, states), grid, mask_mod))


def test_a_new_shape_builds_with_no_sort_and_no_host_sync():
    """Profiled on CPU: on the default path (a non-composed pattern) nothing sorts, and nothing reads a
    tensor back to the host (``_local_scalar_dense`` is .item() / bool(); nonzero sizes its output)."""
    clear_caches()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        SlidingWindow(300).block_mask(4000, 4100, block_size=64)
        Causal().block_mask(3000, 3000, block_size=128)
    names = {event.name for event in prof.events()}
    assert "aten::cumsum" in names and "aten::scatter_" in names  # the profile saw the build
    assert not names & {"aten::sort", "aten::argsort", "aten::nonzero", "aten::_local_scalar_dense", "aten::item"}, names


def _documents(length: int) -> Documents:
    """16 packed documents filling ``length`` (the last one takes the remainder): new lengths each time."""
    return Documents((length // 16,) * 15 + (length - 15 * (length // 16),))


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_cpu_runs_eager():
    assert on_device(block_tables, torch.device("cpu")) is block_tables


def test_a_build_dynamo_cannot_compile_warns_and_runs_eagerly():
    def broken(x):
        torch._dynamo.graph_break()  # as any construct Dynamo cannot trace: an error under fullgraph
        return x.cumsum(0)

    build = compiled(broken)
    with pytest.warns(UserWarning, match="runs eagerly"):
        assert torch.equal(build(torch.tensor([2, 3])), torch.tensor([2, 5]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eager from then on: no second attempt, no second warning
        assert torch.equal(build(torch.tensor([4, 1, 1])), torch.tensor([4, 5, 6]))


@pytest.mark.skipif(not hasattr(torch._dynamo.exc, "FailOnRecompileLimitHit"), reason="torch < 2.6 has no such error")
def test_a_build_at_dynamos_recompile_limit_warns_and_runs_eagerly(monkeypatch):
    """Under fullgraph, Dynamo's recompile limit raises FailOnRecompileLimitHit, which is no TorchDynamoException:
    it used to reach the user as a traceback."""

    def at_limit(*args):
        raise torch._dynamo.exc.FailOnRecompileLimitHit("recompile_limit reached with fullgraph=True")

    def cumulative(x):
        return x.cumsum(0)

    monkeypatch.setattr(torch, "compile", lambda fn, **options: at_limit)
    with pytest.warns(UserWarning, match="runs eagerly"):
        assert torch.equal(compiled(cumulative)(torch.tensor([2, 3])), torch.tensor([2, 5]))


def test_each_pattern_structure_compiles_into_its_own_code_object():
    """Dynamo counts graphs per code object against its recompile limit (8): one shared ``_exact_tables`` failed
    at the ninth kind of pattern. Values (a window's size) share their structure's function; kinds and
    compositions get their own, which computes what ``_exact_tables`` does."""
    window = _tables_of(_structure(SlidingWindow(256)))
    assert window is _tables_of(_structure(SlidingWindow(300, causal=False)))
    others = [_tables_of(_structure(p)) for p in (Causal(), Documents((64, 64)), SlidingWindow(8) | Causal(), Causal() | SlidingWindow(8))]
    codes = {id(fn.__code__) for fn in [window, *others]} | {id(_exact_tables.__code__)}
    assert len(codes) == 6 and window.__name__ == "_exact_tables"
    cpu, pattern = torch.device("cpu"), Documents((300, 212))
    args = (pattern, 512, 512, 64, 64, cpu, pattern._state_inputs(512, cpu))
    assert all(torch.equal(a, b) for a, b in zip(_tables_of(_structure(pattern))(*args), _exact_tables(*args)))


@pytest.mark.slow
def test_nine_kinds_of_pattern_build_on_the_compiled_path(monkeypatch):
    """CUDA's compiled path (here on CPU, Inductor's C++ backend) for more pattern kinds than Dynamo's recompile
    limit (8): every build compiles, none warns or raises, and each mask equals the eager build's (~15 s)."""
    from attnkit.sparse import Dilated, GlobalTokens, PrefixLM

    kinds = [Causal(), SlidingWindow(256), SlidingWindow(256, causal=False), Dilated(4), Dilated(4, causal=False),
             GlobalTokens(4), GlobalTokens(4, causal=False), PrefixLM(64), Documents((1000, 1048))]  # fmt: skip
    clear_caches()
    eager = [p.block_mask(2048, 2048, block_size=128) for p in kinds]
    clear_caches()
    monkeypatch.setattr(patterns, "on_device", lambda fn, device: compiled(fn))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        built = [p.block_mask(2048, 2048, block_size=128) for p in kinds]
    clear_caches()
    for pattern, mine, reference in zip(kinds, built, eager):
        for name in _TABLES:
            assert torch.equal(getattr(mine, name), getattr(reference, name)), (pattern, name)


@pytest.mark.slow
def test_the_compiled_build_equals_eager_and_compiles_once_for_all_lengths():
    """CUDA's path (``compiled``), compiled here by Inductor's C++ backend: every table bit-equal to
    eager, int32, contiguous, its own allocation; one graph per pattern type for every length, query
    offset and document split (~40 s on 2 cores, most of it the first compilation)."""
    cpu = torch.device("cpu")
    build = compiled(_exact_tables)
    for make in (lambda n: SlidingWindow(300), _documents):
        before = _graphs()
        for q_len, kv_len in [(4000, 4000), (4100, 4100), (2944, 5000), (3000, 3000)]:  # cut and whole blocks, offset
            pattern = make(kv_len)
            args = (pattern, q_len, kv_len, 64, 64, cpu, pattern._state_inputs(kv_len, cpu))
            mine, eager = build(*args), _exact_tables(*args)
            assert len({t.data_ptr() for t in mine}) == len(_TABLES)
            for name, a, b in zip(_TABLES, mine, eager):
                assert a.dtype == b.dtype == torch.int32 and a.is_contiguous() and torch.equal(a, b), (pattern, q_len, kv_len, name)
        assert _graphs() - before == 1, f"{make(4000)!r}: {_graphs() - before} graphs for 4 lengths"


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu: needs a CUDA GPU")


@pytest.mark.gpu
@_CUDA
def test_cuda_tables_equal_cpu_and_build_without_syncs():
    clear_caches()
    q, k = (torch.randn(1, 4, 8192, 64, device="cuda") for _ in range(2))
    SlidingWindow(2048).block_mask(65536, 65536, block_size=128, device="cuda")  # warm-up: compiles the graphs,
    select_blocks(q[..., :4096, :], k[..., :4096, :], ContentAware(block_size=128, density=0.2)).block_mask()  # which may sync
    length = 131072 - 128  # a 1023 x 1023 block table, new for both devices
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        on_gpu = SlidingWindow(2048).block_mask(length, length, block_size=128, device="cuda")
        selection_mask = select_blocks(q, k, ContentAware(block_size=128, density=0.2)).block_mask()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    on_cpu = SlidingWindow(2048).block_mask(length, length, block_size=128)
    for name in _TABLES:
        assert torch.equal(getattr(on_gpu, name).cpu(), getattr(on_cpu, name)), name
    assert selection_mask.kv_num_blocks.shape == (1, 4, 64)


@pytest.mark.gpu
@pytest.mark.timing
@_CUDA
@pytest.mark.parametrize("make", [lambda n: SlidingWindow(2048), _documents], ids=["window 2048", "16 documents"])
def test_cuda_new_shape_build_under_one_millisecond(make):
    """Issue 11's goal: a new 128k shape (block 128, 1024 x 1024 blocks) after warm-up in <= 1 ms,
    synchronized, with no new compilation (the warm-up compiled the one dynamic-shape graph)."""
    clear_caches()
    for length in (131072, 65536):  # warm-up: compilation, first kernels, a second length
        make(length).block_mask(length, length, block_size=128, device="cuda")
    graphs, times = _graphs(), []
    for step in range(1, 8):
        length = 131072 - step * 128
        pattern = make(length)
        torch.cuda.synchronize()
        start = time.perf_counter()
        pattern.block_mask(length, length, block_size=128, device="cuda")
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    assert _graphs() == graphs, "a new length compiled again"
    assert statistics.median(times) <= 1.0, times
