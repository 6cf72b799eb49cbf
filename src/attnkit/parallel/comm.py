"""Communication for context parallelism: a ring of batched P2P transfers, and shape agreement.

:class:`RingComm` queues sends to the next rank and receives from the previous one, starts them
together (``dist.batch_isend_irecv``) and waits later, so the next K/V block travels while the
current one is computed. On CUDA, NCCL runs P2P on its own stream, which waits only for the work
queued before the transfer was started; ``wait()`` then makes the compute stream wait for the
transfer, not the host. That NCCL stream is the side stream: the transfer overlaps every kernel
queued between ``commit()`` and ``wait()``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from attnkit.errors import UnsupportedError, check_type, fail

__all__ = ["RingComm", "group_info", "check_same_across_ranks", "all_gather_stacked", "reduce_scatter_stacked"]


def group_info(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group`` (the default group when None).

    Raises:
        UnsupportedError: torch.distributed is not initialized.
        InvalidTypeError: ``group`` is not a process group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise UnsupportedError(
            "group: torch.distributed is not initialized. Launch with torchrun and call "
            "torch.distributed.init_process_group() before context-parallel attention."
        )
    if group is not None:
        check_type(group, dist.ProcessGroup, "group")
    return dist.get_rank(group), dist.get_world_size(group)


class RingComm:
    """Send to rank ``r+1`` and receive from rank ``r-1`` of ``group``, batched and asynchronous.

    Use in rounds: ``send_recv`` any number of tensors, ``commit()`` once, ``wait()`` once; the
    tensors ``send_recv`` returned are valid after ``wait()``. Every rank must run the same
    rounds with tensors of the same shapes. Misuse (commit twice, wait before commit, queue while
    a round is in flight) raises ``RuntimeError``.

    Example::

        comm = RingComm(group)
        next_k, next_v = comm.send_recv(k), comm.send_recv(v)
        comm.commit()
        ...                                   # compute on k, v meanwhile
        comm.wait()
        k, v = next_k, next_v
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank, self.world_size = group_info(group)
        to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.send_rank = to_global((self.rank + 1) % self.world_size)
        self.recv_rank = to_global((self.rank - 1) % self.world_size)
        self._ops: list[dist.P2POp] = []
        self._works: list | None = None

    def send_recv(self, tensor: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Queue sending ``tensor`` onward; return the buffer (``out`` or a new one) that will receive its peer."""
        if self._works is not None:
            raise RuntimeError("RingComm.send_recv: a round is in flight; call wait() before queuing the next one")
        if self.world_size == 1:
            raise RuntimeError("RingComm.send_recv: a group of one rank has no ring to pass tensors around")
        tensor = tensor.contiguous()
        out = torch.empty_like(tensor) if out is None else out
        self._ops.append(dist.P2POp(dist.isend, tensor, self.send_rank, group=self.group))
        self._ops.append(dist.P2POp(dist.irecv, out, self.recv_rank, group=self.group))
        return out

    def commit(self) -> None:
        """Start every queued transfer."""
        if self._works is not None:
            raise RuntimeError("RingComm.commit: called twice without wait()")
        if not self._ops:
            raise RuntimeError("RingComm.commit: nothing queued; call send_recv() first")
        self._works = dist.batch_isend_irecv(self._ops)

    def wait(self) -> None:
        """Block (the host on gloo, the current CUDA stream on NCCL) until the round has arrived."""
        if self._works is None:
            raise RuntimeError("RingComm.wait: called before commit()")
        for work in self._works:
            work.wait()
        self._works, self._ops = None, []

    @property
    def in_flight(self) -> bool:
        """Whether a committed round has not been waited for."""
        return self._works is not None


def check_same_across_ranks(values: dict[str, int], group: dist.ProcessGroup | None, device: torch.device, hint: str) -> None:
    """Raise the same error on every rank unless each rank passed the same ``values``.

    One small all-gather; every rank sees every rank's values, so all raise together and none is
    left waiting in a later collective.

    Raises:
        InvalidArgumentError: naming the first parameter and rank that differ from rank 0.
    """
    rank, world_size = group_info(group)
    mine = torch.tensor(list(values.values()), dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(table, mine, group=group)
    rows = [row.tolist() for row in table]
    for other, row in enumerate(rows):
        for (name, expected), got in zip(zip(values, rows[0]), row):
            if got != expected:
                fail(f"{name} on rank {other}", f"{expected}, as on rank 0", got, hint)


def all_gather_stacked(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every rank's ``x`` stacked in rank order: ``(...) -> (W, ...)``."""
    world_size = dist.get_world_size(group)
    out = torch.empty((world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)  # gloo takes only this form
    _ALL_GATHER(out, x.contiguous(), group=group)
    return out.view(world_size, *x.shape)


def reduce_scatter_stacked(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``x (W, ...)`` summed over ranks, this rank keeping row ``rank``: ``(W, ...) -> (...)``."""
    out = torch.empty(x.shape[1:], dtype=x.dtype, device=x.device)
    _REDUCE_SCATTER(out, x.reshape(-1, *x.shape[2:]).contiguous(), group=group)
    return out


# torch >= 2.13 renames the flat-tensor collectives (the old names warn); older releases have only those.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
