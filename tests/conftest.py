"""Suite-wide test setup: hardware markers skip themselves where the hardware is absent."""

import pytest
import torch

# Two xdist workers share the CI machine's 2 cores: one intra-op thread each. Tiny models run ~10x
# slower when two workers each spin two threads on a loaded 2-core box.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count()
    for item in items:
        if "multi_gpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason=f"multi-gpu: needs 2+ CUDA GPUs, found {gpus}"))
        elif "gpu" in item.keywords and gpus < 1:
            item.add_marker(pytest.mark.skip(reason="gpu: needs a CUDA GPU, none found"))
