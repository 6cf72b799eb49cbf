"""Context parallelism: exact attention over a sequence sharded across the ranks of a process group.

Every function takes this rank's shards ``(B, H, S_local, D)`` of one sequence in a layout
(``zigzag`` balances causal work, ``contiguous`` keeps tokens in order) and returns this rank's
shard of the exact attention output, with forward and backward:

* ``ring_attention``: K/V blocks passed around a ring, partials merged by log-sum-exp in float32.
* ``allgather_attention``: one all-gather of K/V (short sequences, GQA).
* ``ulysses_attention``: all-to-all from sequence shards to head shards and back.
* ``hybrid_attention``: Ulysses along one dimension of a 2-D mesh, ring along the other.

The ring also takes a causal sliding ``window`` and packed-document ``document_ids`` (masks on
global positions; blocks they empty are skipped, see ``ring_schedule``). ``context_parallel(model)``
runs a transformers model's or attnkit ``MultiHeadAttention``'s attention this way on shards from
``shard_lm_batch``.
"""

from attnkit.parallel.allgather import allgather_attention
from attnkit.parallel.comm import RingComm
from attnkit.parallel.layout import (
    LAYOUTS,
    shard,
    shard_chunks,
    shard_hybrid,
    shard_positions,
    shard_sequence,
    unshard,
    unshard_hybrid,
    unshard_sequence,
)
from attnkit.parallel.model import CONTEXT_PARALLEL, ContextParallelConfig, context_parallel, shard_lm_batch
from attnkit.parallel.predict import CP_METHODS, CPHardware, CPPrediction, predict_cp_time
from attnkit.parallel.ring import ring_attention
from attnkit.parallel.schedule import Piece, ring_schedule
from attnkit.parallel.ulysses import hybrid_attention, ulysses_attention

__all__ = [
    # attention over a sharded sequence
    "ring_attention",
    "allgather_attention",
    "ulysses_attention",
    "hybrid_attention",
    # models
    "context_parallel",
    "ContextParallelConfig",
    "CONTEXT_PARALLEL",
    "shard_lm_batch",
    # masks on global positions
    "ring_schedule",
    "Piece",
    # layouts
    "LAYOUTS",
    "shard",
    "unshard",
    "shard_chunks",
    "shard_positions",
    "shard_sequence",
    "unshard_sequence",
    "shard_hybrid",
    "unshard_hybrid",
    # communication
    "RingComm",
    # cost model
    "predict_cp_time", "CPHardware", "CPPrediction", "CP_METHODS",
]
