"""What the links between the GPUs of one host deliver to context parallelism: NCCL ring P2P and all-to-all.

    PYTHONPATH=src torchrun --nproc-per-node 2 benchmarks/parallel/link.py --out $OUT --label default
    NCCL_MIN_P2P_NCHANNELS=16 PYTHONPATH=src torchrun ... --label p2p16   # the same under other NCCL settings

Per message size: the time of one ring step (``RingComm``: send to the next rank, receive from the
previous) and of one ``all_to_all_single``, as the median of CUDA-event times over ``--repeats``
calls (``attnkit.bench.time_fn``), and the bandwidth each rank sends at (bytes leaving the rank / time; an all-to-all's share
for itself never crosses a link and is not counted). Appends one JSON line per run (label, NCCL
variables set, rows) to ``parallel-link-<device>-<W>gpu-<date>.jsonl`` under ``--out``, so runs
under several settings land in one file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from attnkit.bench import time_fn  # noqa: E402
from attnkit.parallel.comm import RingComm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mib", default="8,32,128,512")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--label", default="default")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    rows = []
    for mib in (int(s) for s in args.sizes_mib.split(",")):
        x = torch.randn(mib * 2**20 // 2, dtype=torch.bfloat16, device="cuda")
        comm = RingComm()

        def ring_step():
            comm.send_recv(x)
            comm.commit()
            comm.wait()

        received = torch.empty_like(x)
        ring_ms = time_fn(ring_step, warmup=3, repeats=args.repeats).median_ms
        a2a_ms = time_fn(lambda: dist.all_to_all_single(received, x), warmup=3, repeats=args.repeats).median_ms
        sent = x.numel() * x.element_size()
        worst = torch.tensor([ring_ms, a2a_ms], device="cuda")
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        ring_ms, a2a_ms = worst.tolist()
        rows.append({"mib": mib, "ring_step_ms": ring_ms, "ring_gb_s": sent / ring_ms / 1e6,
                     "all_to_all_ms": a2a_ms, "all_to_all_gb_s": sent * (world_size - 1) / world_size / a2a_ms / 1e6})  # fmt: skip
    if rank == 0:
        nccl = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
        record = {"label": args.label, "device": torch.cuda.get_device_name(), "world_size": world_size, "torch": torch.__version__,
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())), "date": datetime.date.today().isoformat(),
                  "command": "torchrun " + " ".join(sys.argv), "env": nccl, "rows": rows}  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"parallel-link-{torch.cuda.get_device_name().replace(' ', '-').lower()}-{world_size}gpu-{record['date']}.jsonl"
        with open(args.out / name, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(args.label, " | ".join(f"{r['mib']} MiB: ring {r['ring_gb_s']:.0f} GB/s, a2a {r['all_to_all_gb_s']:.0f} GB/s" for r in rows), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
