"""Static patterns: element masks vs brute-force definitions, block states vs counting the dense
mask, BlockMasks vs create_block_mask, composition, and argument errors."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from attnkit.errors import InvalidArgumentError, InvalidTypeError
from attnkit.sparse import (
    EMPTY, FULL, PARTIAL, BigBird, Causal, ContentAware, Dilated, Documents, GlobalTokens, PrefixLM, RandomBlocks, SlidingWindow,
)  # fmt: skip


def _doc(lengths, position):
    total = 0
    for index, length in enumerate(lengths):
        total += length
        if position < total:
            return index
    raise AssertionError(position)


@functools.lru_cache(maxsize=None)
def _cells(pattern, kv_len: int) -> list[list[bool]]:
    return pattern.cells(kv_len).tolist()


def brute(pattern, p: int, j: int, kv_len: int) -> bool:
    """The definition, one (query position, key) pair at a time, written independently of the library."""
    d = p - j
    if isinstance(pattern, Causal):
        return j <= p
    if isinstance(pattern, SlidingWindow):
        return 0 <= d < pattern.window if pattern.causal else abs(d) < pattern.window
    if isinstance(pattern, Dilated):
        reach = float("inf") if pattern.window is None else (pattern.window - 1) * pattern.stride
        near = 0 <= d <= reach if pattern.causal else abs(d) <= reach
        return near and d % pattern.stride == 0
    if isinstance(pattern, GlobalTokens):
        return (j < pattern.count and j <= p) if pattern.causal else (j < pattern.count or p < pattern.count)
    if isinstance(pattern, PrefixLM):
        return j < pattern.prefix or j <= p
    if isinstance(pattern, Documents):
        return _doc(pattern.lengths, p) == _doc(pattern.lengths, j) and (j <= p or not pattern.causal)
    if isinstance(pattern, RandomBlocks):
        cells = _cells(pattern, kv_len)
        return cells[p // pattern.block][j // pattern.block] and (j <= p or not pattern.causal)
    if isinstance(pattern, BigBird):
        return any(brute(part, p, j, kv_len) for part in pattern.parts.parts)
    parts = getattr(pattern, "parts", None)
    combine = any if type(pattern).__name__ == "Union" else all
    return combine(brute(part, p, j, kv_len) for part in parts)


def brute_dense(pattern, q_len: int, kv_len: int) -> torch.Tensor:
    offset = kv_len - q_len
    return torch.tensor([[brute(pattern, i + offset, j, kv_len) for j in range(kv_len)] for i in range(q_len)])


def states_from_dense(dense: torch.Tensor, block_q: int, block_kv: int) -> torch.Tensor:
    """Block states by counting the padded dense mask (what create_block_mask does)."""
    n_q, n_kv = -(-dense.shape[0] // block_q), -(-dense.shape[1] // block_kv)
    padded = torch.nn.functional.pad(dense, (0, n_kv * block_kv - dense.shape[1], 0, n_q * block_q - dense.shape[0]))
    counts = padded.view(n_q, block_q, n_kv, block_kv).sum((1, 3))
    return torch.where(counts == block_q * block_kv, FULL, torch.where(counts > 0, PARTIAL, EMPTY)).to(torch.int8)


PATTERNS = [
    Causal(),
    SlidingWindow(19),
    SlidingWindow(13, causal=False),
    Dilated(3),
    Dilated(4, window=5, causal=False),
    GlobalTokens(5),
    GlobalTokens(9, causal=False),
    PrefixLM(23),
    Documents((11, 30, 1, 18)),
    Documents((40, 20), causal=False),
    RandomBlocks(2, block=16, seed=3),
    RandomBlocks(1, block=12, seed=1, causal=False),
    BigBird(8, num_global=2, num_random=1, block=16),
    SlidingWindow(10) | GlobalTokens(3),
    Causal() & SlidingWindow(9, causal=False),
    (SlidingWindow(6) | Dilated(5)) & Causal(),
]
SHAPES = [(60, 60, 16), (45, 60, 8), (60, 60, (8, 16))]  # (Sq, Skv, block size): cut blocks, Sq < Skv, non-square blocks


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_dense_mask_matches_definition(pattern):
    for q_len, kv_len, _ in SHAPES[:2]:
        assert torch.equal(pattern.to_dense(q_len, kv_len), brute_dense(pattern, q_len, kv_len))


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_block_states_and_density_match_counting(pattern):
    for q_len, kv_len, block in SHAPES:
        block_q, block_kv = (block, block) if isinstance(block, int) else block
        expected = states_from_dense(brute_dense(pattern, q_len, kv_len), block_q, block_kv)
        assert torch.equal(pattern.block_states(q_len, kv_len, block_size=block), expected), (q_len, kv_len, block)
        assert pattern.density(q_len, kv_len, block_size=block) == pytest.approx(float((expected != EMPTY).float().mean()))


_TABLES = ["kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"]


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_block_mask_equals_create_block_mask(pattern):
    if isinstance(pattern, Documents):
        pattern = Documents((100, 57, 1, 99), causal=pattern.causal)
    for q_len, kv_len, block in ((200, 257, 64), (257, 257, 64)):
        mine = pattern.block_mask(q_len, kv_len, block_size=block)
        theirs = create_block_mask(pattern.mask_mod(q_len, kv_len), None, None, q_len, kv_len, device="cpu", BLOCK_SIZE=block)
        for name in _TABLES:
            assert torch.equal(getattr(mine, name), getattr(theirs, name)), name
        assert mine.shape == theirs.shape and mine.BLOCK_SIZE == theirs.BLOCK_SIZE


def test_block_mask_is_cached_and_accepts_the_op_shape():
    pattern = SlidingWindow(64)
    first = pattern.block_mask(300, 300, block_size=64)
    assert pattern.block_mask(2, 4, 300, 300, block_size=64) is first  # attention()'s (B, H, Sq, Skv) form
    assert SlidingWindow(64).block_mask(300, 300, block_size=64) is first  # equal patterns share it
    assert pattern.block_mask(310, 310, block_size=64) is not first


def test_flops_count_the_computed_elements():
    # Causal at 4 blocks of 64 over 250 keys: 10 computed blocks; the last row and column are cut.
    elements = sum(min(64, 250 - 64 * r) * min(64, 250 - 64 * c) for r in range(4) for c in range(r + 1))
    assert Causal().flops(250, head_dim=32, block_size=64) == elements * 4 * 32
    assert Causal().flops(250, head_dim=32, block_size=64, batch=2, heads=3, backward=True) == int(elements * 4 * 32 * 6 * 3.5)


def test_random_blocks_are_seeded_and_causal():
    cells = RandomBlocks(3, block=16, seed=7).cells(640)
    assert torch.equal(cells, RandomBlocks(3, block=16, seed=7).cells(640))
    assert not torch.equal(cells, RandomBlocks(3, block=16, seed=8).cells(640))
    assert not cells.triu(1).any()  # causal: never a later block
    per_row = cells.sum(1)
    assert per_row.min() >= 1 and per_row.max() <= 3
    assert torch.equal(RandomBlocks(3, block=16, seed=7).cells(320), cells[:20, :20])  # rows do not depend on the length


def test_repr_and_picture_are_readable():
    pattern = SlidingWindow(256) | GlobalTokens(4)
    assert repr(pattern) == "(SlidingWindow(window=256, causal=True) | GlobalTokens(count=4, causal=True))"
    assert repr(Documents((512,) * 16)) == "Documents(16 documents, length 512, total 8192, causal=True)"
    picture = Causal().picture(256, block_size=64)
    assert picture.splitlines()[1:] == ["|░   |", "|█░  |", "|██░ |", "|███░|"]
    assert "density=0.625" in picture.splitlines()[0]


def test_from_ids():
    assert Documents.from_ids(torch.tensor([4, 4, 1, 1, 1, 9])) == Documents((2, 3, 1))
    with pytest.raises(InvalidArgumentError, match="ids"):
        Documents.from_ids(torch.tensor([0, 1, 0]))


@pytest.mark.parametrize(
    "build, parameter",
    [
        (lambda: SlidingWindow(0), "window"),
        (lambda: SlidingWindow(-3), "window"),
        (lambda: SlidingWindow(8, causal="yes"), "causal"),
        (lambda: Dilated(0), "stride"),
        (lambda: GlobalTokens(0), "count"),
        (lambda: PrefixLM(2.5), "prefix"),
        (lambda: Documents([3, 4]), "lengths"),
        (lambda: Documents((3, 0)), "lengths"),
        (lambda: BigBird(16, num_random=-1), "num_random"),
        (lambda: Causal().block_mask(100, 100, block_size=0), "block_size"),
        (lambda: Causal().block_mask(100, 100, block_size=(64,)), "block_size"),
        (lambda: Causal().block_mask(100, 100, 100), "shape"),
        (lambda: Causal().block_mask(200, 100), "q_len"),
        (lambda: Documents((50, 60)).block_mask(100, 100), "lengths"),
        (lambda: ContentAware(topk=2, mass=0.9), "topk/density/mass"),
        (lambda: ContentAware(density=0.0), "density"),
        (lambda: ContentAware(mass=1.5), "mass"),
        (lambda: ContentAware(block_size=-64, topk=2), "block_size"),
    ],
)
def test_bad_arguments_name_the_parameter(build, parameter):
    with pytest.raises((InvalidArgumentError, InvalidTypeError)) as error:
        build()
    assert error.value.parameter == parameter


def test_composing_with_a_non_pattern_is_a_type_error():
    with pytest.raises(InvalidTypeError, match="other"):
        Causal() | 3
    with pytest.raises(InvalidTypeError, match="other"):
        Causal() & torch.ones(4, 4, dtype=torch.bool)


@pytest.mark.parametrize("pattern", PATTERNS[::3], ids=repr)
def test_mask_mod_traces_in_one_graph(pattern):
    # Compiled FlexAttention (CUDA) inlines the mask_mod into its kernel: dynamo must trace it whole.
    mask_mod = pattern.mask_mod(45, 60)
    traced = torch.compile(mask_mod, fullgraph=True, backend="eager")
    b, h, q_idx, kv_idx = torch.tensor(0), torch.tensor(0), torch.arange(45)[:, None], torch.arange(60)[None, :]
    assert torch.equal(traced(b, h, q_idx, kv_idx), mask_mod(b, h, q_idx, kv_idx))
