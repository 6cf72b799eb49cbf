"""Suite-wide test setup: hardware markers skip themselves where the hardware is absent; one shared
capture per zoo model for the discovery and analysis tests (``captured_zoo``)."""

import functools
import gc
import time

import pytest
import torch

# Two xdist workers share the CI machine's 2 cores: one intra-op thread each. Tiny models run ~10x
# slower when two workers each spin two threads on a loaded 2-core box.
torch.set_num_threads(1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """After a test that ran for a while (it built a model), collect reference cycles at once: exported
    graphs and modules hold cycles that Python's generational GC frees late, and without this one
    worker's RSS climbed from 2.3 to 3.4 GB over tests/discover alone."""
    start = time.perf_counter()
    yield
    if time.perf_counter() - start > 0.5:
        gc.collect()


SEQ = 16
"""Tokens per example for the text models in ``captured_zoo`` unless a test needs a reference shape; ViTs fix 197."""

_ZOO_NAMES = ("vit_b_16", "vit_l_16", "bert", "gpt2", "llama", "t5", "nn-transformer", "nn_transformer")


# At most one capture alive: full-size zoo models hold their real weights (ViT-L/16 alone 1.2 GB), and
# a session-wide cache of all of them took one worker past 7 GB. Tests of one model run together
# (in file order, and in one xdist group under `--dist loadgroup`), so a small cache still captures
# each model about once per file.
@functools.lru_cache(maxsize=1)
def _captured_zoo(name: str, attn_implementation: str = "sdpa", batch_size: int = 2, seq_len: int | None = SEQ):
    from attnkit.discover import capture, find_attention
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


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count()
    for item in items:
        if "captured_zoo" in getattr(item, "fixturenames", ()):  # one xdist group per zoo model
            name = next((zoo for zoo in _ZOO_NAMES if zoo in item.nodeid.lower()), None)
            if name is not None:
                item.add_marker(pytest.mark.xdist_group(name.replace("_", "-")))
        if "multi_gpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason=f"multi-gpu: needs 2+ CUDA GPUs, found {gpus}"))
        elif "gpu" in item.keywords and gpus < 1:
            item.add_marker(pytest.mark.skip(reason="gpu: needs a CUDA GPU, none found"))
