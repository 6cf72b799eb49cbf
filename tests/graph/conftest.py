"""Shared fixtures for tests/graph: one capture per zoo model and shape per session (export is the slow part)."""

import functools

import pytest

SEQ = 16
"""Tokens per example for the text models unless a test needs a reference shape; ViTs fix 197."""


# At most one capture alive: full-size zoo models hold their real weights (ViT-L/16 alone 1.2 GB), and
# a session-wide cache of all of them took one worker past 7 GB. Tests of one model run together
# (xdist groups, and in file order), so a small cache still captures each model about once per file.
@functools.lru_cache(maxsize=1)
def _captured_zoo(name: str, attn_implementation: str = "sdpa", batch_size: int = 2, seq_len: int | None = SEQ):
    from attnkit.graph.attention import find_attention
    from attnkit.graph.capture import capture
    from attnkit.models import build_model

    zoo = build_model(name, batch_size=batch_size, seq_len=None if name.startswith("vit") else seq_len,
                      attn_implementation=attn_implementation)
    captured = capture(zoo.model, zoo.example_inputs, zoo.example_kwargs)
    return zoo, captured, find_attention(captured)


@pytest.fixture(scope="session")
def captured_zoo():
    """``captured_zoo(name, attn="sdpa", batch_size=2, seq_len=16) -> (ZooModel, CapturedGraph, sites)``, cached.

    Callers must not modify what they get: other tests share it.
    """
    return _captured_zoo


_ZOO_NAMES = ("vit_b_16", "vit_l_16", "bert", "gpt2", "llama", "t5", "nn-transformer", "nn_transformer")


def pytest_collection_modifyitems(items):
    """Tests of one zoo model share an xdist group, so each worker captures a model at most once."""
    for item in items:
        if "captured_zoo" not in getattr(item, "fixturenames", ()):
            continue
        name = next((zoo for zoo in _ZOO_NAMES if zoo in item.nodeid.lower()), None)
        if name is not None:
            item.add_marker(pytest.mark.xdist_group(name.replace("_", "-")))


def pytest_xdist_make_scheduler(config, log):
    """Schedule by xdist group (tests without one are spread as usual) when tests/graph is run directly."""
    from xdist.scheduler import LoadGroupScheduling

    return LoadGroupScheduling(config, log)
