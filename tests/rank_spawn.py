"""Spawn test ranks with a deadline: a failing or hanging rank fails the test instead of hanging it.

Used by the context-parallel tests (``tests/parallel``) and the FSDP2 FP8 test (``tests/fp8``);
``tests/`` is on ``sys.path`` (its ``conftest.py``), so both import ``from rank_spawn import spawn``.
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 120.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks of ``backend``; return each rank's result.

    With ``"nccl"`` rank ``r`` uses CUDA device ``r``. Fails the test (after killing every rank)
    when the ranks are not done within ``timeout`` s.
    """
    # Forked ranks start in well under a second (torch and attnkit are already imported). Where CUDA is
    # available a fork is not safe: a process that initialized CUDA cannot fork, and once any backward ran,
    # autograd's device threads make the forked ranks' backward fail ("Autograd and Fork"; seen on the GPU
    # machine when another test file of the same worker had trained something), so it spawns (seconds per rank).
    method = "spawn" if backend == "nccl" or torch.cuda.is_available() else "fork"
    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(_rank_main, args=(world_size, backend, folder, fn, args), nprocs=world_size,
                                     join=False, start_method=method)  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
                if time.monotonic() > deadline:
                    pytest.fail(f"{world_size} ranks did not finish within {timeout:.0f} s; killed them")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join(5)
        return [torch.load(os.path.join(folder, f"rank{rank}.pt"), weights_only=False) for rank in range(world_size)]


def _rank_main(rank: int, world_size: int, backend: str, folder: str, fn, args) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"file://{folder}/store", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        torch.save(fn(rank, world_size, *args), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
