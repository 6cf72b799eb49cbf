"""Content-aware selection: forced sink/local blocks, top-k / density / mass rules against a
brute-force ranking of the pooled estimates, a planted relevant block, and the selected
attention against the float64 reference (forward and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.ops import attention
from attnkit.sparse import EMPTY, Causal, ContentAware, SlidingWindow, select_blocks, sparse_attention


def _qk(batch=2, heads=4, heads_kv=2, length=300, dim=16, seed=0, dtype=torch.float64, structured=False):
    """Random q, k; ``structured`` adds a direction per 32-block, so pooled estimates are peaked."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=generator, dtype=dtype)
    k = torch.randn(batch, heads_kv, length, dim, generator=generator, dtype=dtype)
    if structured:
        blocks = math.ceil(length / 32)
        for x in (q, k):
            x += torch.randn(x.shape[:2] + (blocks, dim), generator=generator, dtype=dtype).repeat_interleave(32, 2)[:, :, :length]
    return q, k


def _estimate(q, k, block):
    """Pooled-score softmax per (B, H, query block) over causal key blocks, written out by hand."""
    batch, heads, length, dim = q.shape
    n = math.ceil(length / block)
    k = k.repeat_interleave(heads // k.shape[1], 1)
    pooled_q = torch.stack([q[:, :, i * block : (i + 1) * block].mean(2) for i in range(n)], 2)
    pooled_k = torch.stack([k[:, :, i * block : (i + 1) * block].mean(2) for i in range(n)], 2)
    sizes = torch.tensor([min(block, length - i * block) for i in range(n)], dtype=q.dtype)
    scores = pooled_q @ pooled_k.transpose(-1, -2) / math.sqrt(dim) + sizes.log()
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, -math.inf), -1)


@pytest.mark.parametrize("config", [ContentAware(block_size=32, topk=3), ContentAware(block_size=32, density=0.3),
                                    ContentAware(block_size=32, mass=0.7, sink_blocks=2, local_blocks=2)], ids=repr)  # fmt: skip
def test_sink_and_local_blocks_always_kept(config):
    q, k = _qk()
    blocks = select_blocks(q, k, config).blocks
    n = blocks.shape[-1]
    for row in range(n):
        for column in list(range(min(config.sink_blocks, row + 1))) + list(range(max(0, row - config.local_blocks + 1), row + 1)):
            assert blocks[..., row, column].all(), (row, column)
    assert not blocks.triu(1).any()  # within the causal base


def test_topk_and_density_keep_the_best_blocks():
    q, k = _qk()
    estimate = _estimate(q, k, 32)
    for config, quota in ((ContentAware(block_size=32, topk=4), lambda row: 4), (ContentAware(block_size=32, density=0.3), lambda row: math.ceil(0.3 * (row + 1)))):
        blocks = select_blocks(q, k, config).blocks
        for row in range(blocks.shape[-2]):
            kept = blocks[..., row, : row + 1]
            assert torch.all(kept.sum(-1) == min(row + 1, max(quota(row), 2 if row > 0 else 1)))
            # every dropped block scores at most the weakest kept non-forced block
            free = kept.clone()
            free[..., 0] = False
            free[..., row] = False
            weakest = estimate[..., row, : row + 1].masked_fill(~free, math.inf).amin(-1)
            dropped = estimate[..., row, : row + 1].masked_fill(kept, -math.inf).amax(-1)
            assert torch.all((dropped <= weakest + 1e-12) | ~free.any(-1))


@pytest.mark.parametrize("tau", [0.5, 0.8, 0.95])
def test_mass_threshold_reaches_tau_with_the_fewest_blocks(tau):
    q, k = _qk(seed=3, structured=True)
    selection = select_blocks(q, k, ContentAware(block_size=32, mass=tau))
    estimate = _estimate(q, k, 32)
    kept_mass = (estimate * selection.blocks).sum(-1)
    torch.testing.assert_close(kept_mass.float(), selection.estimated_mass)
    assert torch.all(kept_mass >= tau - 1e-6)
    # minimal: dropping the weakest kept non-forced block falls below tau
    for row in range(2, estimate.shape[-2]):
        kept = selection.blocks[..., row, :].clone()
        kept[..., 0] = kept[..., row] = False
        has_free = kept.any(-1)
        weakest = estimate[..., row, :].masked_fill(~kept, math.inf).amin(-1)
        assert torch.all(~has_free | (kept_mass[..., row] - weakest < tau))
    assert selection.density < Causal().density(300, block_size=32)


def test_a_planted_relevant_block_is_selected():
    q, k = _qk(batch=1, heads=2, heads_kv=2, length=512, dim=16, seed=4)
    key = torch.randn(16, dtype=q.dtype)
    k[0, 1, 200:232] += 4 * key  # key block 6 of head 1 matches every query of the last blocks
    q[0, 1, 384:] += 4 * key
    blocks = select_blocks(q, k, ContentAware(block_size=32, topk=3)).blocks
    assert blocks[0, 1, 12:, 6].all() and not blocks[0, 0, 12:, 6].all()


@pytest.mark.parametrize("config", [ContentAware(block_size=64, mass=0.9), ContentAware(block_size=64, topk=2, base=SlidingWindow(200))], ids=repr)
def test_selected_attention_matches_reference(config):
    q, k = _qk(batch=1, heads=4, heads_kv=2, length=257, seed=5, structured=True)
    v = torch.randn(1, 2, 257, 16, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = sparse_attention(q, k, v, config, return_lse=True)
    selection = select_blocks(q, k, config)
    assert selection.density < (selection.base_states != EMPTY).float().mean()  # it skipped something
    dense = selection.blocks.repeat_interleave(64, -2).repeat_interleave(64, -1)[..., :257, :257] & config.base.to_dense(257)
    ref, ref_lse = attention(q, k, v, mask=dense, backend="reference", return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
