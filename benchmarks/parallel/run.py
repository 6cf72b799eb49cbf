"""Context-parallel attention on N GPUs: attnkit ring / Ulysses / all-gather vs torch's context_parallel vs one GPU.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=src \\
        torchrun --nproc-per-node 2 benchmarks/parallel/run.py --out $OUT

Causal self-attention fwd+bwd at B1 H16 D128 bf16 (issue 10's anchor shapes) for each length in
``--lengths``. Rows, each the median of CUDA-event times (the slowest rank's median):

* ``one-gpu cudnn`` / ``one-gpu flash``: the whole sequence on one GPU (every rank runs it on its
  own GPU at once); ideal = the faster of the two / world size;
* ``attnkit ring``: ``ring_attention`` (zigzag), ``attnkit ulysses``, ``attnkit allgather`` (zigzag);
* ``torch cp cudnn`` / ``torch cp flash`` (allgather and alltoall rotation): torch's
  ``context_parallel`` (load-balanced), when this torch has it.

``% of ideal`` = ideal / time. Accuracy: out, dq, dk, dv of every attnkit method at this world size
against a float64 reference on a small case, next to the one-GPU kernel's error on the same input.
Writes ``parallel-<device>-<W>gpu-<date>.json`` under ``--out`` on rank 0. A method that fails
records its error and the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import traceback
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
from attnkit.parallel import allgather_attention, ring_attention, shard, ulysses_attention

METHODS = {
    "attnkit ring": (ring_attention, "zigzag"),
    "attnkit ulysses": (ulysses_attention, "contiguous"),
    "attnkit allgather": (allgather_attention, "zigzag"),
}


def _args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="32768,131072,524288", help="global sequence lengths, comma-separated")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--heads-kv", type=int, default=None, help="KV heads (GQA); default: --heads")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--accuracy-length", type=int, default=4096, help="sequence length of the float64 accuracy case (0: skip)")
    parser.add_argument("--no-torch-cp", action="store_true", help="skip torch's context_parallel rows")
    parser.add_argument("--device", default="cuda", help="cuda (NCCL), or cpu (gloo) for a smoke test of the script")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    return parser.parse_args()


def _repeats(seq: int) -> tuple[int, int]:
    """(warm-up, timed) calls: enough for a median, few enough that 512k stays within minutes."""
    return (3, 10) if seq <= 32768 else (2, 5) if seq <= 131072 else (1, 2)


DEVICE = "cuda"


def _slowest(value: float) -> float:
    tensor = torch.tensor([value], device=DEVICE)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def _timed(step, seq: int) -> dict:
    """Median fwd+bwd time (slowest rank) and peak memory (largest rank) of ``step``."""
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    warmup, repeats = _repeats(seq)
    dist.barrier()
    timing = time_fn(step, warmup=warmup, repeats=repeats, device=DEVICE)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else math.nan
    return {"ms": _slowest(timing.median_ms), "min_ms": _slowest(timing.min_ms), "repeats": repeats, "peak_gib": _slowest(peak)}


def _inputs(args, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    shapes = {"q": args.heads, "k": args.heads_kv, "v": args.heads_kv, "grad": args.heads}
    return {name: torch.randn(args.batch, heads, seq, args.dim, device=DEVICE, dtype=torch.bfloat16, generator=generator) for name, heads in shapes.items()}


def _one_gpu(full, backend):
    q, k, v = (full[name].clone().requires_grad_(True) for name in "qkv")
    gqa = q.shape[1] != k.shape[1]

    def step():
        q.grad = k.grad = v.grad = None
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).backward(full["grad"])

    return step


def _attnkit(full, method, rank, world_size):
    fn, layout = METHODS[method]
    q, k, v, grad = (shard(full[name], rank, world_size, layout=layout) for name in ("q", "k", "v", "grad"))
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))

    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v, causal=True, layout=layout, verify=False).backward(grad)

    return step


def _torch_cp(full, backend, rotate, mesh, seq):
    """torch's context_parallel: shards the buffers (load-balanced) on entry, then runs SDPA as ring attention."""
    from torch.distributed.tensor.experimental import context_parallel

    try:
        from torch.distributed.tensor.experimental._attention import set_rotate_method
    except ImportError:
        from torch.distributed.tensor.experimental._context_parallel._attention import set_rotate_method  # type: ignore
    set_rotate_method(rotate)
    buffers = [full[name].clone() for name in ("q", "k", "v", "grad")]
    with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2, 2], no_restore_buffers=set(buffers)):
        q, k, v = (x.detach().requires_grad_(True) for x in buffers[:3])

        def step():
            q.grad = k.grad = v.grad = None
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(buffers[3])

        return _timed(step, seq)


def _speed(args, seq: int, rank, world_size, mesh) -> list[dict]:
    """Every row at one length. Past 128k the slower variants (one-GPU flash, torch CP alltoall)
    are left out to keep the run within minutes; the anchors have none there either."""
    full = _inputs(args, seq)
    long = seq > 131072
    cells: dict[str, dict] = {}
    candidates = [("one-gpu cudnn", lambda: _timed(_one_gpu(full, SDPBackend.CUDNN_ATTENTION), seq))]
    if not long:
        candidates.append(("one-gpu flash", lambda: _timed(_one_gpu(full, SDPBackend.FLASH_ATTENTION), seq)))
    candidates += [(method, lambda m=method: _timed(_attnkit(full, m, rank, world_size), seq)) for method in METHODS]
    if not args.no_torch_cp:
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            for rotate in ("allgather",) if long else ("allgather", "alltoall"):
                candidates.append((f"torch cp {name} {rotate}", lambda b=backend, r=rotate: _torch_cp(full, b, r, mesh, seq)))
    for name, measure in candidates:
        try:
            cells[name] = measure()
        except Exception as error:  # noqa: BLE001  a failing method is a result, not the end of the run
            cells[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            if rank == 0:
                traceback.print_exc()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        if rank == 0:
            print(f"S={seq:>8} {name:<28} {cells[name]}", flush=True)
    ones = [cells[n]["ms"] for n in ("one-gpu cudnn", "one-gpu flash") if "ms" in cells.get(n, {})]
    ideal = min(ones) / world_size if ones else math.nan
    rows = []
    for name, cell in cells.items():
        if "ms" in cell and not name.startswith("one-gpu"):
            cell["pct_of_ideal"] = 100.0 * ideal / cell["ms"]
        rows.append({"seq": seq, "method": name, "ideal_ms": ideal, **cell})
    return rows


def _reference(full) -> dict[str, torch.Tensor]:
    q, k, v = (full[name].double().requires_grad_(True) for name in "qkv")
    group = q.shape[1] // k.shape[1]
    k_all, v_all = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    seq = q.shape[2]
    scores = (q @ k_all.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v_all
    out.backward(full["grad"].double())
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _relative(x, ref) -> float:
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


def _accuracy(args, rank, world_size) -> dict:
    """Relative max error vs float64 of each method (joined over ranks) and of the one-GPU kernel."""
    full = _inputs(args, args.accuracy_length, seed=1)
    ref = _reference(full)
    out, lse = forward_with_lse(full["q"], full["k"], full["v"], causal=True)
    dq, dk, dv = backward_from_lse(full["grad"], full["q"], full["k"], full["v"], out, lse, causal=True)
    result = {"one-gpu kernel": {name: _relative(x, ref[name]) for name, x in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv))}}
    for method, (fn, layout) in METHODS.items():
        q, k, v, grad = (shard(full[name], rank, world_size, layout=layout) for name in ("q", "k", "v", "grad"))
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))
        try:
            out = fn(q, k, v, causal=True, layout=layout)
            out.backward(grad)
        except Exception as error:  # noqa: BLE001
            result[method] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            continue
        errors = {}
        for name, local in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            mine = shard(ref[name], rank, world_size, layout=layout)
            worst = torch.tensor([(local.double() - mine).abs().max().item()], device=DEVICE)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            errors[name] = worst.item() / ref[name].abs().max().item()
        errors["ratio_to_one_gpu"] = max(errors[n] / result["one-gpu kernel"][n] for n in ("out", "dq", "dk", "dv"))
        result[method] = errors
    return {"seq": args.accuracy_length, "dtype": "bfloat16", "errors": result}


def main() -> None:
    global DEVICE
    args = _args()
    args.heads_kv = args.heads_kv or args.heads
    DEVICE = args.device
    cuda = DEVICE == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=300))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(DEVICE, (world_size,))
    started = datetime.datetime.now(datetime.timezone.utc)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    path = args.out / f"parallel-{slug}-{world_size}gpu-{started.date().isoformat()}.json"
    record = {
        "benchmark": "context-parallel causal attention, forward + backward",
        "device": device,
        "world_size": world_size,
        "torch": torch.__version__,
        "date": started.date().isoformat(),
        "started_utc": started.isoformat(timespec="seconds"),
        "command": "torchrun --nproc-per-node {} benchmarks/parallel/run.py {}".format(world_size, " ".join(sys.argv[1:])),
        "env": {name: os.environ.get(name) for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")},
        "shape": {"batch": args.batch, "heads": args.heads, "heads_kv": args.heads_kv, "dim": args.dim, "dtype": "bfloat16", "causal": True},
        "ideal": "fastest one-GPU time (cuDNN, or flash up to 128k; same run) / world size",
        "timing": "median of CUDA-event times per fwd+bwd, the slowest rank's; peak_gib the largest rank's",
        "accuracy": _accuracy(args, rank, world_size) if args.accuracy_length else None,
        "results": [],
    }
    if rank == 0:
        print("accuracy", json.dumps(record["accuracy"]), flush=True)
    for seq in (int(s) for s in args.lengths.split(",")):
        record["results"] += _speed(args, seq, rank, world_size, mesh)
        record["seconds"] = round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1)
        if rank == 0:  # after every length, so a run cut short keeps what it measured
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1) + "\n")
            print(f"wrote {path}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
