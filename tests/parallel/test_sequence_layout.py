"""Sequence layouts: shard and unshard are exact inverses, zigzag balances causal work, bad splits raise."""

import pytest
import torch

from attnkit.errors import InvalidArgumentError
from attnkit.parallel import shard, shard_chunks, shard_hybrid, shard_positions, unshard, unshard_hybrid


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_unshard_inverts_shard_exactly(layout, world_size):
    x = torch.randn(2, 3, 2 * world_size * 5, 7)
    shards = [shard(x, rank, world_size, layout=layout) for rank in range(world_size)]
    assert all(s.shape == (2, 3, 10, 7) for s in shards)
    assert torch.equal(unshard(shards, layout=layout), x)
    positions = torch.cat([shard_positions(x.shape[2], world_size, rank, layout) for rank in range(world_size)])
    assert torch.equal(positions.sort().values, torch.arange(x.shape[2]))  # every token on exactly one rank


def test_zigzag_holds_chunk_r_and_its_mirror():
    assert shard_positions(8, 2, 0, "zigzag").tolist() == [0, 1, 6, 7]
    assert shard_positions(8, 2, 1, "zigzag").tolist() == [2, 3, 4, 5]
    assert shard_chunks(16, 4, 1, "zigzag") == [(2, 4), (12, 14)]
    assert shard_chunks(16, 4, 1, "contiguous") == [(4, 8)]


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_zigzag_balances_causal_work(world_size):
    seq = 2 * world_size * 4

    def causal_pairs(layout, rank):  # (query, key) pairs with key <= query among this rank's queries
        return int((shard_positions(seq, world_size, rank, layout) + 1).sum())

    zigzag = {causal_pairs("zigzag", r) for r in range(world_size)}
    contiguous = [causal_pairs("contiguous", r) for r in range(world_size)]
    assert len(zigzag) == 1
    assert contiguous[-1] > 2 * contiguous[0]


@pytest.mark.parametrize("ring, ulysses", [(2, 2), (2, 4), (4, 2), (1, 3)])
def test_hybrid_layout_nests_ring_then_contiguous(ring, ulysses):
    x = torch.arange(2 * ring * ulysses * 3).reshape(1, 1, -1, 1)
    shards = [shard_hybrid(x, rank // ulysses, ring, rank % ulysses, ulysses) for rank in range(ring * ulysses)]
    assert torch.equal(unshard_hybrid(shards, ring), x)
    ring_shard = shard(x, 1 % ring, ring)
    assert torch.equal(torch.cat(shards[(1 % ring) * ulysses : (1 % ring + 1) * ulysses], dim=2), ring_shard)


def test_bad_splits_raise_naming_the_parameter():
    x = torch.randn(1, 2, 12, 4)
    with pytest.raises(InvalidArgumentError, match=r"seq_len: expected a multiple of 8 \(2 x 4 ranks\) for layout 'zigzag', got 12"):
        shard(x, 0, 4)
    with pytest.raises(InvalidArgumentError, match="layout: expected one of"):
        shard(x, 0, 2, layout="striped")
    with pytest.raises(InvalidArgumentError, match=r"rank: expected an int in \[0, 2\)"):
        shard(x, 2, 2)
    with pytest.raises(InvalidArgumentError, match="shards: expected shards of one length"):
        unshard([x, x[:, :, :6]], layout="contiguous")


def test_schedule_refuses_a_window_without_causal():
    """A window with causal=False would be one-sided (every future key visible): refused, not computed."""
    from attnkit.errors import UnsupportedError
    from attnkit.parallel.schedule import ring_schedule

    with pytest.raises(UnsupportedError, match="window"):
        ring_schedule(64, 2, 0, causal=False, window=8)
