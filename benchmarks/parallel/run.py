"""Context-parallel attention on N GPUs: attnkit ring / Ulysses / all-gather / hybrid vs torch's
context_parallel vs one GPU, with a time budget; and the error vs float64 at world sizes 1, 2, 4, ...

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=src \\
        torchrun --nproc-per-node 4 benchmarks/parallel/run.py --out $OUT \\
        --lengths 32768,131072,524288,1048576,2097152 --budget-s 270
    python benchmarks/parallel/run.py --table FILE.json      # the Markdown table of a result file, with predicted times

Causal self-attention fwd+bwd at B1 H16 D128 bf16 (issue 10's anchor shapes; ``--heads-kv`` for
GQA) for each length in ``--lengths``. A cell is one method at one length: the median of CUDA-event
times per fwd+bwd (the slowest rank's) and the largest rank's peak memory. Methods:

* ``one-gpu cudnn`` / ``one-gpu flash``: the whole sequence on one GPU (every rank runs it on its own
  GPU at once), up to ``--max-one-gpu-length``; ideal = the faster / world size. Past that length
  the ideal is the one-GPU time at the longest measured length S0 times (S/S0)^2, and the row says
  ``"ideal": "extrapolated (S^2 from S0)"``;
* ``attnkit ring`` (zigzag), ``attnkit ulysses`` (one exchange each way; the ``2 head groups`` /
  ``4 head groups`` rows pipeline the exchanges with the kernels, ``head_chunks``), ``attnkit allgather`` (zigzag);
* ``attnkit hybrid UxR``: Ulysses over U ranks (inner mesh dim) x ring over R (``hybrid_attention``
  on a ``(R, U)`` DeviceMesh); by default 2x2 at 4 ranks and 8x1, 4x2, 2x4 at 8;
* ``torch cp cudnn|flash allgather|alltoall``: torch's ``context_parallel`` (load-balanced).
* ``--documents N``: N equal packed causal documents; only one-GPU (the documents as one dense cuDNN call), ring and Ulysses.

One-GPU flash and torch CP alltoall run only up to ``--all-variants-length``; lengths from
``--long-length`` on run only ``--long-methods`` with ``--long-repeats``. Cells run in two passes:
the core cells (one-GPU cuDNN and the long methods) at every length first, then the rest, each
pass by increasing length. A cell is not started when its estimated time (from the same method's
time at a shorter length, scaled by (S/S0)^2) would end past ``--budget-s``, when its predicted
peak memory (scaled by S/S0) exceeds ``--memory-fraction`` of the GPU, or when the method failed
at a shorter length; such cells are recorded with ``"skipped": reason``. A method that fails
records its error (agreed across ranks) and the run goes on.

Accuracy: one seeded bf16 case (``--accuracy-length`` tokens) and its float64 reference; every
attnkit method runs it on sub-groups of 1, 2, 4, ..., W ranks (``dist.new_subgroups``; the hybrids
on a ``(W/g, R, U)`` mesh sliced to ``(R, U)``), all on identical global tensors, and records the
relative max and RMS error of out, dq, dk, dv per size and their growth error(W) / error(2).

Writes ``parallel-<device>-<W>gpu-<date>.json`` under ``--out`` on rank 0 after every cell (a run
cut short keeps what finished) and prints the table at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time
import traceback
from functools import partial
from pathlib import Path

# Multicast (NVLS) can take a shared host's GPUs out of service: keep it off whatever the launcher set.
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

try:
    import attnkit  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkit.bench.timing import time_fn
from attnkit.ops.kernels import backward_from_lse, forward_with_lse
from attnkit.hardware import stored_profile
from attnkit.ops.spec import AttentionSpec
from attnkit.sparse import Documents, sparse_attention
from attnkit.parallel import CPHardware, allgather_attention, hybrid_attention, predict_cp_time, ring_attention, shard, shard_hybrid, ulysses_attention

METHODS = {
    "attnkit ring": (ring_attention, "zigzag"),
    "attnkit ulysses": (ulysses_attention, "contiguous"),
    "attnkit ulysses 2 head groups": (partial(ulysses_attention, head_chunks=2), "contiguous"),
    "attnkit ulysses 4 head groups": (partial(ulysses_attention, head_chunks=4), "contiguous"),
    "attnkit allgather": (allgather_attention, "zigzag"),
}
ULYSSES_GROUPS = ("attnkit ulysses 2 head groups", "attnkit ulysses 4 head groups")
"""Ulysses with its exchanges pipelined over head groups (``head_chunks``; the default row is 1 group)."""
ONE_GPU = {"one-gpu cudnn": SDPBackend.CUDNN_ATTENTION, "one-gpu flash": SDPBackend.FLASH_ATTENTION}
TORCH_CP = {f"torch cp {name} {rotate}": (backend, rotate) for rotate in ("allgather", "alltoall") for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION))}
DEFAULT_HYBRIDS = {4: "2x2", 8: "8x1,4x2,2x4"}
"""Ulysses x ring shapes per world size (issue 14)."""
TENSORS = ("out", "dq", "dk", "dv")
DEVICE = "cuda"


def _args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--lengths", default="32768,131072,524288", help="global sequence lengths, comma-separated")
    add("--batch", type=int, default=1)
    add("--heads", type=int, default=16)
    add("--heads-kv", type=int, default=None, help="KV heads (GQA); default: --heads")
    add("--dim", type=int, default=128)
    add("--methods", default="all", help="comma-separated row names to run (default: all)")
    add("--hybrids", default="auto", help="Ulysses x ring shapes 'UxR,...' (auto: 2x2 at 4 ranks, 8x1,4x2,2x4 at 8; 'none')")
    add("--max-one-gpu-length", type=int, default=524288, help="longest length the one-GPU baseline runs at; beyond, the ideal is extrapolated (S^2)")
    add("--all-variants-length", type=int, default=131072, help="longest length for one-GPU flash and torch CP alltoall")
    add("--long-length", type=int, default=1048576, help="from this length on run only --long-methods, with --long-repeats")
    add("--long-methods", default=None, help="rows run at lengths >= --long-length (default: 'attnkit ring,torch cp cudnn allgather', "
        "those of them the run has)")
    add("--long-repeats", default="1,2", help="warm-up,timed calls at lengths >= --long-length")
    add("--budget-s", type=float, default=360.0, help="start no cell whose estimated end is past this many seconds after start")
    add("--memory-fraction", type=float, default=0.92, help="skip a cell whose predicted peak exceeds this fraction of GPU memory")
    add("--accuracy-length", type=int, default=4096, help="sequence length of the float64 accuracy case (0: skip)")
    add("--accuracy-sizes", default="auto", help="sub-group sizes for the accuracy (auto: 1, 2, 4, ..., W)")
    add("--no-torch-cp", action="store_true", help="skip torch's context_parallel rows")
    add("--documents", type=int, default=0, help="N > 0: N packed causal documents of equal length (the ring and Ulysses get "
        "document_ids; the one-GPU baseline runs them as one dense cuDNN call, attnkit.sparse; no torch CP, all-gather or hybrid rows)")
    add("--device", default="cuda", help="cuda (NCCL), or cpu (gloo) for a smoke test of the script")
    add("--pg-timeout-s", type=float, default=180.0, help="process-group timeout: a hung collective ends the run after this")
    add("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    add("--table", type=Path, default=None, help="print the Markdown table of this result JSON and exit (no torchrun)")
    return parser.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------- collectives of the harness itself


def _reduce(values: list[float], op=dist.ReduceOp.MAX, group=None) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=DEVICE)
    dist.all_reduce(tensor, op=op, group=group)
    return tensor.tolist()


def _agree(local: dict | None, error: str | None) -> tuple[dict | None, str | None]:
    """Every rank's outcome of a cell, joined: the slowest rank's times, the largest peak, and the
    failure if any rank failed (its message from the lowest failing rank). Runs outside the
    cell's try block, so a failure on some ranks never leaves the others in a different collective."""
    local = local or {}
    keys = ("ms", "min_ms", "peak_gib", "seconds")
    joined = _reduce([float(error is not None)] + [float(local.get(k, 0.0)) for k in keys])
    if joined[0] == 0:
        return dict(zip(keys, joined[1:])), None
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, error)
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    return None, f"{failed[0][1]} (rank{'s' if len(failed) > 1 else ''} {', '.join(str(r) for r, _ in failed)})"


# ---------------------------------------------------------------- inputs


def _tensor(args, seq: int, name: str, seed: int) -> torch.Tensor:
    """One global input, the same values whichever others are generated: its own seeded stream."""
    index = ("q", "k", "v", "grad").index(name)
    heads = args.heads if name in ("q", "grad") else args.heads_kv
    generator = torch.Generator(device=DEVICE).manual_seed(1000 * seed + index)
    return torch.randn(args.batch, heads, seq, args.dim, device=DEVICE, dtype=torch.bfloat16, generator=generator)


def _inputs(args, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return {name: _tensor(args, seq, name, seed) for name in ("q", "k", "v", "grad")}


def _shards(args, seq: int, shard_fn, seed: int = 0) -> dict[str, torch.Tensor]:
    """This rank's shards, one global tensor alive at a time (2M tokens: 8.6 GB each)."""
    return {name: shard_fn(_tensor(args, seq, name, seed)) for name in ("q", "k", "v", "grad")}


# ---------------------------------------------------------------- one fwd+bwd step per method


def _documents(args, seq: int):
    """The ``--documents`` packing of ``seq`` tokens as a pattern, or None."""
    return Documents((seq // args.documents,) * args.documents) if args.documents else None


def _one_gpu(args, seq, backend):
    full = _inputs(args, seq)
    q, k, v = (full[name].requires_grad_(True) for name in "qkv")
    gqa = q.shape[1] != k.shape[1]
    if DEVICE != "cuda":
        backend = SDPBackend.MATH  # CPU smoke test: the fused kernels are CUDA-only
    documents = _documents(args, seq)

    def step():
        q.grad = k.grad = v.grad = None
        if documents is not None:  # equal documents: one dense call over more, shorter heads
            sparse_attention(q, k, v, documents).backward(full["grad"])
            return
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).backward(full["grad"])

    return step


def _attnkit(args, seq, method, rank, world_size):
    fn, layout = METHODS[method]
    local = _shards(args, seq, lambda x: shard(x, rank, world_size, layout=layout))
    q, k, v = (local[name].requires_grad_(True) for name in "qkv")
    masks = {}
    if args.documents:
        ids = torch.arange(args.documents, device=DEVICE).repeat_interleave(seq // args.documents)[None]
        masks["document_ids"] = shard(ids, rank, world_size, layout=layout, dim=1)

    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v, causal=True, layout=layout, verify=False, **masks).backward(local["grad"])

    return step


def _hybrid(args, seq, mesh):
    """``hybrid_attention`` on ``mesh`` (R, U): zigzag over the ring, contiguous inside (``shard_hybrid``)."""
    (ring_size, ulysses_size), here = mesh.shape, (mesh.get_local_rank(0), mesh.get_local_rank(1))
    local = _shards(args, seq, lambda x: shard_hybrid(x, here[0], ring_size, here[1], ulysses_size))
    q, k, v = (local[name].requires_grad_(True) for name in "qkv")

    def step():
        q.grad = k.grad = v.grad = None
        hybrid_attention(q, k, v, mesh=mesh, causal=True, verify=False).backward(local["grad"])

    return step


def _torch_cp(args, seq, backend, rotate, mesh, timed):
    """torch's context_parallel: shards the buffers (load-balanced) on entry, then runs SDPA as ring attention."""
    from torch.distributed.tensor.experimental import context_parallel

    try:
        from torch.distributed.tensor.experimental._attention import set_rotate_method
    except ImportError:
        from torch.distributed.tensor.experimental._context_parallel._attention import set_rotate_method  # type: ignore
    set_rotate_method(rotate)
    buffers = list(_inputs(args, seq).values())  # sharded in place on entry (the storage stays full-size)
    gqa = {"enable_gqa": True} if args.heads != args.heads_kv else {}  # passed only where needed (the 2-GPU run's call had none)
    with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2, 2], no_restore_buffers=set(buffers)):
        q, k, v = (x.detach().requires_grad_(True) for x in buffers[:3])

        def step():
            q.grad = k.grad = v.grad = None
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa).backward(buffers[3])

        return timed(step)


# ---------------------------------------------------------------- cells, estimates, budget


class Bench:
    """The cells of one run: what each method measured, what the next cell would cost, the JSON rows."""

    def __init__(self, args, rank: int, world_size: int, hybrids: dict[str, object]):
        self.args, self.rank, self.world_size, self.hybrids = args, rank, world_size, hybrids
        self.cells: dict[tuple[int, str], dict] = {}
        self.order = list(ONE_GPU) + ["attnkit ring"] + list(hybrids) + ["attnkit ulysses", *ULYSSES_GROUPS, "attnkit allgather"] + ([] if args.no_torch_cp else list(TORCH_CP))
        if args.documents:  # the rows that take document_ids (torch CP takes no mask)
            self.order = ["one-gpu cudnn", "attnkit ring", "attnkit ulysses"]
        if args.long_methods is None:
            args.long_methods = ",".join(m for m in ("attnkit ring", "torch cp cudnn allgather") if m in self.order)
        for option, names in (("--methods", args.methods), ("--long-methods", args.long_methods)):
            unknown = [m for m in names.split(",") if m not in self.order and names != "all"]
            if unknown:  # a typo would silently drop rows from a one-shot run
                raise SystemExit(f"{option}: unknown rows {unknown}; rows at {world_size} ranks: {', '.join(self.order)}")
        self.memory_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30 if DEVICE == "cuda" else math.inf

    # which cells, in which order
    def methods_at(self, seq: int) -> list[str]:
        args, wanted = self.args, self.args.methods
        names = [m for m in self.order if wanted == "all" or m in wanted.split(",")]
        if seq > args.max_one_gpu_length:
            names = [m for m in names if m not in ONE_GPU]
        if seq > args.all_variants_length:  # the slow variants; the anchors have none there either
            names = [m for m in names if m != "one-gpu flash" and not m.endswith("alltoall")]
        if seq >= args.long_length:
            names = [m for m in names if m in args.long_methods.split(",")]
        return names

    def plan(self, lengths: list[int]) -> list[tuple[int, str]]:
        core = {"one-gpu cudnn", *self.args.long_methods.split(",")}
        cells = [(seq, m) for seq in lengths for m in self.methods_at(seq)]
        return [c for c in cells if c[1] in core] + [c for c in cells if c[1] not in core]

    def repeats(self, seq: int) -> tuple[int, int]:
        """(warm-up, timed) calls: enough for a median, few enough that long lengths fit the budget."""
        if seq >= self.args.long_length:
            warmup, timed = _ints(self.args.long_repeats)
            return warmup, timed
        return (3, 10) if seq <= 32768 else (2, 5) if seq <= 131072 else (1, 2)

    # estimates from what ran
    def _measured(self, method: str, below: int) -> tuple[int, dict] | None:
        shorter = [(s, c) for (s, m), c in self.cells.items() if m == method and s < below and "ms" in c]
        return max(shorter, key=lambda item: item[0]) if shorter else None

    def estimate_s(self, seq: int, method: str) -> float | None:
        """Seconds the cell would take: the same method's fixed cost at S0 plus its calls scaled by (S/S0)^2."""
        calls = sum(self.repeats(seq))
        found = self._measured(method, seq)
        if found is None:  # never measured: twice the ideal per call, when there is one
            ideal = self.ideal(seq)[0]
            return None if ideal is None else calls * 2 * ideal / 1e3
        s0, cell = found
        fixed = max(cell["seconds"] - (cell["warmup"] + cell["repeats"]) * cell["ms"] / 1e3, 0.0)
        return fixed + calls * cell["ms"] / 1e3 * (seq / s0) ** 2

    def skip_reason(self, seq: int, method: str, elapsed: float) -> str | None:
        failed = [s for (s, m), c in self.cells.items() if m == method and s < seq and "error" in c]
        if failed:
            return f"failed at {min(failed)}"
        found = self._measured(method, seq)
        if found is not None:
            predicted = found[1]["peak_gib"] * seq / found[0]
            if predicted > self.args.memory_fraction * self.memory_gib:
                return f"memory: predicted peak {predicted:.0f} GiB (S/S0 from {found[0]}) > {self.args.memory_fraction:.2f} x {self.memory_gib:.0f} GiB"
        estimate = self.estimate_s(seq, method)
        if estimate is not None and elapsed + estimate > self.args.budget_s:
            return f"budget: estimated {estimate:.1f} s would end at {elapsed + estimate:.1f} s > --budget-s {self.args.budget_s:g}"
        return None

    def ideal(self, seq: int) -> tuple[float | None, str]:
        """(ideal ms, how): the fastest one-GPU time / W at this length, else extrapolated from the longest measured."""
        ones: dict[int, float] = {}  # length -> fastest one-GPU ms
        for (s, m), c in self.cells.items():
            if m in ONE_GPU and "ms" in c:
                ones[s] = min(ones.get(s, math.inf), c["ms"])
        if seq in ones:
            return ones[seq] / self.world_size, "measured"
        shorter = [s for s in ones if s < seq]
        if not shorter:
            return None, "no one-GPU time"
        s0 = max(shorter)
        return ones[s0] * (seq / s0) ** 2 / self.world_size, f"extrapolated (S^2 from {s0})"

    def rows(self) -> list[dict]:
        rows = []
        for (seq, method), cell in sorted(self.cells.items(), key=lambda item: (item[0][0], self.order.index(item[0][1]))):
            ideal, how = self.ideal(seq)
            row = {"seq": seq, "method": method, "ideal_ms": ideal, "ideal": how, **cell}
            if "ms" in cell and method not in ONE_GPU and ideal is not None:
                row["pct_of_ideal"] = 100.0 * ideal / cell["ms"]
            rows.append(row)
        return rows

    # running one cell
    def run(self, seq: int, method: str, meshes: dict) -> dict:
        warmup, repeats = self.repeats(seq)

        def timed(step) -> dict:
            timing = time_fn(step, warmup=warmup, repeats=repeats, device=DEVICE)
            peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
            return {"ms": timing.median_ms, "min_ms": timing.min_ms, "peak_gib": peak}

        if DEVICE == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        begin, local, error = time.perf_counter(), None, None
        try:
            if method in ONE_GPU:
                local = timed(_one_gpu(self.args, seq, ONE_GPU[method]))
            elif method in METHODS:
                local = timed(_attnkit(self.args, seq, method, self.rank, self.world_size))
            elif method in self.hybrids:
                local = timed(_hybrid(self.args, seq, self.hybrids[method]))
            else:
                local = _torch_cp(self.args, seq, *TORCH_CP[method], meshes["world"], timed)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            local["seconds"] = time.perf_counter() - begin
        except Exception as caught:  # noqa: BLE001  a failing method is a result, not the end of the run
            error = f"{type(caught).__name__}: {str(caught)[:300]}"
            if self.rank == 0:
                traceback.print_exc()
        joined, error = _agree(local, error)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        if error is not None:
            return {"error": error, "seconds": round(time.perf_counter() - begin, 1)}
        return {**joined, "warmup": warmup, "repeats": repeats}


# ---------------------------------------------------------------- accuracy on sub-groups of 1, 2, 4, ... W ranks


def _reference(full) -> dict[str, torch.Tensor]:
    """out, dq, dk, dv in float64 by the explicit formula, one query head at a time (S x S per head)."""
    q, k, v, grad = (full[name].double() for name in ("q", "k", "v", "grad"))
    heads, seq, group = q.shape[1], q.shape[2], q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    hidden = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
    out, dq, dk, dv = torch.empty_like(q), torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for h in range(heads):
        kh, vh, qh, gh = k[:, h // group], v[:, h // group], q[:, h], grad[:, h]
        probs = torch.softmax((qh @ kh.transpose(-2, -1) * scale).masked_fill(hidden, float("-inf")), dim=-1)  # (B, S, S)
        out[:, h] = probs @ vh
        dv[:, h // group] += probs.transpose(-2, -1) @ gh
        dscores = probs * (gh @ vh.transpose(-2, -1) - (gh * out[:, h]).sum(-1, keepdim=True))
        dq[:, h] = dscores @ kh * scale
        dk[:, h // group] += dscores.transpose(-2, -1) @ qh * scale
    return {"out": out, "dq": dq, "dk": dk, "dv": dv}


def _errors(local: dict[str, torch.Tensor], mine: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], replicas: int) -> dict:
    """Relative max and RMS error of each tensor over the whole sequence (every rank's shard; the
    ``replicas`` identical groups each count once)."""
    worst = _reduce([(local[n].double() - mine[n]).abs().max().item() for n in TENSORS])
    squares = _reduce([((local[n].double() - mine[n]) ** 2).sum().item() for n in TENSORS], op=dist.ReduceOp.SUM)
    result = {}
    for i, name in enumerate(TENSORS):
        result[name] = worst[i] / ref[name].abs().max().item()
        result[f"{name}_rms"] = math.sqrt(squares[i] / replicas) / ref[name].norm().item()
    return result


def _accuracy(args, rank: int, world_size: int, hybrid_shapes: list[tuple[int, int]]) -> dict:
    """Error vs float64 of every attnkit method at each sub-group size, on the same global data."""
    full = _inputs(args, args.accuracy_length, seed=1)
    ref = _reference(full)
    out, lse = forward_with_lse(full["q"], full["k"], full["v"], causal=True)
    grads = backward_from_lse(full["grad"], full["q"], full["k"], full["v"], out, lse, causal=True)
    one = dict(zip(TENSORS, (out, *grads)))
    kernel = {}
    for name in TENSORS:
        kernel[name] = (one[name].double() - ref[name]).abs().max().item() / ref[name].abs().max().item()
        kernel[f"{name}_rms"] = (one[name].double() - ref[name]).norm().item() / ref[name].norm().item()
    sizes = [1 << i for i in range(world_size.bit_length()) if (1 << i) <= world_size] if args.accuracy_sizes == "auto" else _ints(args.accuracy_sizes)
    sizes = [g for g in sizes if world_size % g == 0]
    by_size: dict[str, dict[str, dict]] = {}
    for g in sizes:
        group, _ = dist.new_subgroups(group_size=g)  # consecutive ranks; every group runs the same case
        local_rank = rank % g
        runs = [(m, fn, layout, {"group": group}, lambda x, layout=layout: shard(x, local_rank, g, layout=layout)) for m, (fn, layout) in METHODS.items() if m not in ULYSSES_GROUPS]
        from torch.distributed.device_mesh import init_device_mesh

        for ulysses, ring in hybrid_shapes:
            if g % ulysses == 0:
                sub = init_device_mesh(DEVICE, (world_size // g, g // ulysses, ulysses), mesh_dim_names=("replica", "ring", "ulysses"))["ring", "ulysses"]
                here = (sub.get_local_rank(0), sub.get_local_rank(1))
                cut = lambda x, here=here, r=g // ulysses, u=ulysses: shard_hybrid(x, here[0], r, here[1], u)  # noqa: E731
                runs.append((f"attnkit hybrid {ulysses}x{ring}", hybrid_attention, "zigzag", {"mesh": sub}, cut))
        for method, fn, layout, where, cut in runs:
            local, error = {}, None
            try:
                q, k, v, grad = (cut(full[name]) for name in ("q", "k", "v", "grad"))
                q, k, v = (x.requires_grad_(True) for x in (q, k, v))
                result = fn(q, k, v, causal=True, layout=layout, **where)
                result.backward(grad)
                local = {"out": result.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
            except Exception as caught:  # noqa: BLE001
                error = f"{type(caught).__name__}: {str(caught)[:300]}"
            _, error = _agree({}, error)
            if error is not None:
                by_size.setdefault(method, {})[str(g)] = {"error": error}
                continue
            mine = {name: cut(ref[name]) for name in TENSORS}
            by_size.setdefault(method, {})[str(g)] = _errors(local, mine, ref, world_size // g)
    errors = {"one-gpu kernel": kernel}
    growth = {}
    for method, per_size in by_size.items():
        at_w = per_size.get(str(world_size), {})
        if "out" in at_w:  # issue 10's fields: the error at this world size, and its ratio to the one-GPU kernel
            errors[method] = {**{n: at_w[n] for n in TENSORS}, "ratio_to_one_gpu": max(at_w[n] / kernel[n] for n in TENSORS)}
        elif at_w:
            errors[method] = at_w
        measured = sorted(int(g) for g, e in per_size.items() if "out" in e and int(g) >= 2)
        if len(measured) >= 2:
            small, large = str(measured[0]), str(measured[-1])
            growth[method] = {"from": int(small), "to": int(large)}
            for name in TENSORS:
                growth[method][name] = per_size[large][name] / per_size[small][name]
                growth[method][f"{name}_rms"] = per_size[large][f"{name}_rms"] / per_size[small][f"{name}_rms"]
    return {
        "seq": args.accuracy_length,
        "dtype": "bfloat16",
        "metric": "max |x - ref| / max |ref| over the whole sequence (and *_rms: ||x - ref|| / ||ref||); ref float64",
        "errors": errors,
        "by_world_size": by_size,
        "growth": growth,
        "growth_goal": "error(W) / error(2) <= 1.2 for every tensor (issue 14)",
    }


# ---------------------------------------------------------------- the table


CALIBRATION_LENGTH = 131072
"""The one-GPU cuDNN length whose time calibrates the predicted column (else the longest measured)."""


def predictions(record: dict) -> tuple[str, dict[tuple[int, str], float]]:
    """``attnkit.parallel.predict_cp_time`` of every measured attnkit ring / Ulysses / hybrid cell, in ms,
    calibrated on this file's own one-GPU cuDNN time (memory bandwidth from the device's built-in
    profile); and a line saying which calibration. Empty when the file has no one-GPU time."""
    shape = record["shape"]
    dtype = getattr(torch, shape.get("dtype", "bfloat16"))

    def spec(seq):
        return AttentionSpec(shape["batch"], shape["heads"], seq, shape["dim"], heads_kv=shape["heads_kv"], causal=shape.get("causal", True), dtype=dtype)

    one_gpu = {r["seq"]: r["ms"] for r in record["results"] if r["method"] == "one-gpu cudnn" and "ms" in r}
    if not one_gpu or shape.get("documents"):  # the cost model knows no masks
        return "", {}
    seq0 = CALIBRATION_LENGTH if CALIBRATION_LENGTH in one_gpu else max(one_gpu)
    profile = next((stored_profile(key) for key in ("h200", "h100") if key in record["device"].lower()), None)
    hardware = CPHardware.calibrated(spec(seq0), one_gpu[seq0], profile=profile)
    predicted = {}
    for r in record["results"]:
        method, world_size = r["method"], record["world_size"]
        if "ms" not in r or not (method in ("attnkit ring", "attnkit ulysses") or method.startswith("attnkit hybrid")):
            continue
        if method.startswith("attnkit hybrid"):
            ulysses = int(method.split()[-1].split("x")[0])
            predicted[(r["seq"], method)] = predict_cp_time(spec(r["seq"]), "hybrid", world_size, hardware, ulysses_size=ulysses).total_ms
        else:
            predicted[(r["seq"], method)] = predict_cp_time(spec(r["seq"]), method.split()[1], world_size, hardware).total_ms
    return f"{hardware.name}; link {hardware.link_gbs:g} GB/s, HBM {hardware.memory_gbs:g} GB/s, overlap {hardware.overlap:g}", predicted


def table(record: dict) -> str:
    """Markdown: one row per method, one column per length, '% of ideal (ms)'; then the accuracy."""
    rows = record["results"]
    lengths = sorted({r["seq"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in sorted(rows, key=lambda r: r["seq"])))
    cell = {(r["seq"], r["method"]): r for r in rows}

    def label(seq):
        return f"{seq // 1048576}M" if seq % 1048576 == 0 else f"{seq // 1024}k" if seq % 1024 == 0 else str(seq)

    def text(r):
        if r is None:
            return "—"
        if "skipped" in r:
            return "skipped (" + r["skipped"].split(":")[0] + ")"
        if "error" in r:
            return "error (" + r["error"].split(":")[0] + ")"
        star = "*" if r.get("ideal", "").startswith("extrapolated") else ""
        ms = f"{r['ms']:.1f} ms" if r["ms"] < 1e4 else f"{r['ms'] / 1e3:.2f} s"
        return f"{r['pct_of_ideal']:.1f}%{star} ({ms})" if "pct_of_ideal" in r else ms

    packed = f", {record['shape']['documents']} packed documents" if record["shape"].get("documents") else ""
    lines = [f"{record['world_size']}x {record['device']}, torch {record['torch']}, {record['date']}; "
             f"B{record['shape']['batch']} H{record['shape']['heads']} KV{record['shape']['heads_kv']} D{record['shape']['dim']} causal{packed} bf16 fwd+bwd; "
             "% of ideal (median time); ideal = fastest one-GPU time / ranks",
             "", "| method | " + " | ".join(label(s) for s in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    lines += ["| " + m + " | " + " | ".join(text(cell.get((s, m))) for s in lengths) + " |" for m in methods]
    extrapolated = sorted({f"{label(r['seq'])}: {r['ideal']}" for r in rows if r.get("ideal", "").startswith("extrapolated")})
    if extrapolated:
        lines.append("\n\\* ideal " + "; ".join(extrapolated) + " (one-GPU time not measured there).")
    calibration, predicted = predictions(record)
    if predicted:
        lines += ["", f"Predicted per-rank time (attnkit.parallel.predict_cp_time, {calibration}) vs measured:", "",
                  "| method | length | measured | predicted | error |", "|---|---|---|---|---|"]
        for (seq, method), ms in sorted(predicted.items(), key=lambda item: (methods.index(item[0][1]), item[0][0])):
            measured = cell[(seq, method)]["ms"]
            lines.append(f"| {method} | {label(seq)} | {measured:.1f} ms | {ms:.1f} ms | {100 * (ms / measured - 1):+.1f}% |")
    peaks = [f"{r['method']} {label(r['seq'])}: {r['peak_gib']:.1f} GiB" for r in rows if r["seq"] == max(lengths) and r.get("peak_gib")]
    if peaks:
        lines.append(f"\nPeak memory per rank at {label(max(lengths))}: " + ", ".join(peaks) + ".")
    accuracy = record.get("accuracy")
    if accuracy and accuracy.get("by_world_size"):
        sizes = sorted({int(g) for per in accuracy["by_world_size"].values() for g in per})
        lines += ["", f"Error vs float64 (bf16, {accuracy['seq']} tokens, relative RMS out / dq / dk / dv) per number of ranks; growth = error(W) / error(2):", "",
                  "| method | " + " | ".join(f"{g} rank{'s' if g > 1 else ''}" for g in sizes) + " | growth |", "|---" * (len(sizes) + 2) + "|"]
        for method, per in accuracy["by_world_size"].items():
            def err(e):
                return "—" if e is None else "error" if "error" in e else " / ".join(f"{e[n + '_rms']:.2e}" for n in TENSORS)
            grown = accuracy["growth"].get(method)
            grown_text = "—" if not grown else f"{grown['from']}→{grown['to']}: " + " / ".join(f"{grown[n + '_rms']:.2f}" for n in TENSORS)
            lines.append(f"| {method} | " + " | ".join(err(per.get(str(g))) for g in sizes) + f" | {grown_text} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def _hybrid_shapes(args, world_size: int) -> list[tuple[int, int]]:
    text = DEFAULT_HYBRIDS.get(world_size, "") if args.hybrids == "auto" else "" if args.hybrids == "none" else args.hybrids
    shapes = []
    for item in filter(None, text.split(",")):
        ulysses, ring = (int(x) for x in item.lower().split("x"))
        if ulysses * ring != world_size:
            raise SystemExit(f"--hybrids: {item} is {ulysses * ring} ranks, the world has {world_size}")
        shapes.append((ulysses, ring))
    return shapes


def main() -> None:
    global DEVICE
    args = _args()
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return
    args.heads_kv = args.heads_kv or args.heads
    DEVICE = args.device
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.pg_timeout_s))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh

    started = time.perf_counter()
    shapes = _hybrid_shapes(args, world_size)
    meshes = {"world": init_device_mesh(DEVICE, (world_size,))}
    hybrids = {f"attnkit hybrid {u}x{r}": init_device_mesh(DEVICE, (r, u), mesh_dim_names=("ring", "ulysses")) for u, r in shapes}
    bench = Bench(args, rank, world_size, hybrids)
    now = datetime.datetime.now(datetime.timezone.utc)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    path = args.out / f"parallel-{slug}-{world_size}gpu-{now.date().isoformat()}.json"
    record = {
        "benchmark": "context-parallel causal attention, forward + backward",
        "device": device,
        "world_size": world_size,
        "torch": torch.__version__,
        "date": now.date().isoformat(),
        "started_utc": now.isoformat(timespec="seconds"),
        "command": "torchrun --nproc-per-node {} benchmarks/parallel/run.py {}".format(world_size, " ".join(sys.argv[1:])),
        "env": {name: os.environ.get(name) for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")},
        "shape": {"batch": args.batch, "heads": args.heads, "heads_kv": args.heads_kv, "dim": args.dim, "dtype": "bfloat16", "causal": True,
                  "documents": args.documents},
        "ideal": f"fastest one-GPU time (cuDNN, or flash up to {args.all_variants_length}; same run) / world size; past "
                 f"{args.max_one_gpu_length} tokens the longest measured one-GPU time scaled by (S/S0)^2 (rows say 'extrapolated')",
        "timing": "median of CUDA-event times per fwd+bwd, the slowest rank's; peak_gib the largest rank's; seconds = wall time of the cell",
        "hybrid": "attnkit hybrid UxR: Ulysses over U ranks (mesh dim 1, consecutive ranks) x zigzag ring over R (mesh dim 0)",
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "table")},
        "accuracy": None,
        "results": [],
    }

    def write():
        record["results"] = bench.rows()
        record["seconds"] = round(time.perf_counter() - started, 1)
        if rank == 0:  # after every cell, so a run cut short keeps what it measured
            args.out.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".json.partial")
            partial.write_text(json.dumps(record, indent=1) + "\n")
            partial.replace(path)

    if args.accuracy_length:
        try:
            record["accuracy"] = _accuracy(args, rank, world_size, shapes)
        except Exception as error:  # noqa: BLE001  (the reference itself failed; every rank computes it alike)
            record["accuracy"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            if rank == 0:
                traceback.print_exc()
        if rank == 0:
            print("accuracy", json.dumps(record["accuracy"]), flush=True)
        write()
    for seq, method in bench.plan(_ints(args.lengths)):
        elapsed = _reduce([time.perf_counter() - started])[0]  # one clock for every rank's decision
        reason = bench.skip_reason(seq, method, elapsed)
        bench.cells[(seq, method)] = {"skipped": reason} if reason else bench.run(seq, method, meshes)
        write()
        if rank == 0:
            print(f"[{time.perf_counter() - started:6.0f} s] S={seq:>8} {method:<28} {bench.cells[(seq, method)]}", flush=True)
    dist.barrier()
    if rank == 0:
        print(f"wrote {path}\n\n{table(record)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
