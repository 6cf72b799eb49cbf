"""benchmarks/sparse/train.py: training through the sparse backend. With every causal block kept,
content-aware training must follow dense training step for step (the gathered backward is exact);
with blocks dropped it must still learn, and differ from dense."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from attnkit.sparse import ContentAware, SlidingWindow

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "sparse"


@pytest.fixture()
def train(monkeypatch):
    monkeypatch.syspath_prepend(str(_BENCH))  # the benchmark imports its siblings (quality.py, stdlib_gpt.py)
    import train

    return train


def _run(train, setting, steps=20, device="cpu", block=None):
    from stdlib_gpt import GPT

    config = dataclasses.replace(train.PRESETS["smoke"], steps=steps, curve_every=1)
    config = config if block is None else dataclasses.replace(config, block=block)
    data = (torch.arange(20_000) * 7) % 251  # learnable (each byte gives the next); the loop is under test, not the corpus
    torch.manual_seed(0)
    model = GPT(config.layers, config.dim, config.heads)
    record = train.train_one(copy.deepcopy(model).to(device), data, setting, config, seed=0, device=torch.device(device))
    return torch.tensor(record["curve"]["loss"], dtype=torch.float64)


def test_keeping_every_block_trains_like_dense(train):
    dense = _run(train, None)
    everything = _run(train, ContentAware(block_size=32, density=1.0))
    # float32 SDPA vs the float32 gathered path: rounding only (2e-7 relative over 20 steps here).
    torch.testing.assert_close(everything, dense, rtol=1e-4, atol=0)
    assert dense[-3:].mean() < dense[:3].mean() - 0.3  # and training moved


def test_dropped_blocks_still_learn_and_change_the_run(train):
    dense = _run(train, None)
    window = _run(train, SlidingWindow(32))
    assert torch.isfinite(window).all() and window[-3:].mean() < window[:3].mean() - 0.3
    assert (window - dense).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu: needs a CUDA GPU")
def test_cuda_flex_backward_trains_like_dense(train):
    """On CUDA the sparse backward is compiled FlexAttention (bf16 autocast): every block kept follows dense
    SDPA within bf16 drift; a window still learns."""
    dense = _run(train, None, device="cuda")  # blocks of 128 (FlexAttention's default) over the 256-byte windows
    everything = _run(train, ContentAware(block_size=128, density=1.0), device="cuda", block=128)
    torch.testing.assert_close(everything, dense, rtol=2e-2, atol=0)  # bf16: ~3 significant digits, 20 steps of drift
    window = _run(train, SlidingWindow(32), device="cuda", block=128)
    assert torch.isfinite(window).all() and window[-3:].mean() < window[:3].mean() - 0.3
