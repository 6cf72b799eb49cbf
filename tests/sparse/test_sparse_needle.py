"""Needle retrieval at 4k tokens: content-aware selection keeps the needle's block, a causal window of
the same (or higher) block density loses it."""

from __future__ import annotations

import pytest

from attnkit.sparse import ContentAware, SlidingWindow
from attnkit.sparse.needle import needle_retrieval, needle_task

SEQ, BLOCK = 4096, 64


@pytest.fixture(scope="module")
def task():
    return needle_task(SEQ, trials=8, block_size=BLOCK, seed=0)


def _equal_density_window(density: float) -> SlidingWindow:
    """The narrowest causal window (in whole blocks) whose block density is at least ``density``."""
    window = BLOCK
    while SlidingWindow(window).density(SEQ, block_size=BLOCK) < density:
        window += BLOCK
    return SlidingWindow(window)


def test_content_aware_keeps_the_needle_a_window_of_equal_density_loses_it(task):
    content = needle_retrieval(ContentAware(block_size=BLOCK, density=0.05), task)
    window = needle_retrieval(_equal_density_window(content.density), task)
    assert content.dense_accuracy == 1.0  # the task is solvable
    assert content.density < 0.05 and window.density >= content.density
    assert content.accuracy == 1.0 and content.recall > 0.8, content
    # The needle lies in [S/8, S/2): far outside a ~128-token window; chance is 1/64 per trial.
    assert window.accuracy <= 0.25 and window.recall < 0.1, window


def test_too_little_content_budget_is_detected(task):
    """Planted fault: keeping only the sink and local blocks (topk=2) must fail the same check."""
    forced_only = needle_retrieval(ContentAware(block_size=BLOCK, topk=2), task)
    assert forced_only.accuracy <= 0.25 and forced_only.recall < 0.1, forced_only
