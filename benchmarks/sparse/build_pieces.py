"""Where a new 128k block-mask build's time goes on CUDA, SlidingWindow(2048) and 16 packed documents: synced
wall milliseconds of each piece (state inputs, mask_mod, the compiled tables, the BlockMask), medians of 11 new
lengths after warm-up, and a torch.profiler table of one build.

    PYTHONPATH=src python benchmarks/sparse/build_pieces.py $OUT/build-pieces.json
"""

import json
import statistics
import sys
import time
import torch
from torch.profiler import profile, ProfilerActivity
from attnkit.ops.cache import clear_caches
from attnkit.sparse import Documents, SlidingWindow
from attnkit.sparse import patterns as P
from attnkit.sparse.blocks import Grid, block_mask_from_tables, on_device

dev = torch.device("cuda", 0)


def docs(n):
    return Documents((n // 16,) * 15 + (n - 15 * (n // 16),))


rec = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
for name, make in (("window", lambda n: SlidingWindow(2048)), ("docs", docs)):
    clear_caches()
    for length in (131072, 65536):
        make(length).block_mask(length, length, block_size=128, device="cuda")
    parts = {k: [] for k in ("state_inputs", "mask_mod", "tables", "blockmask", "whole")}
    for step in range(1, 12):
        n = 131072 - step * 128
        p = make(n)

        def t(key, fn):
            torch.cuda.synchronize()
            s = time.perf_counter()
            r = fn()
            torch.cuda.synchronize()
            parts[key].append((time.perf_counter() - s) * 1e3)
            return r

        inputs = t("state_inputs", lambda: p._state_inputs(n, dev))
        mm = t("mask_mod", lambda: p.mask_mod(n, n, dev))
        tabs = t("tables", lambda: on_device(P._tables_of(P._structure(p)), dev)(p, n, n, 128, 128, dev, inputs))
        t("blockmask", lambda: block_mask_from_tables(tabs, Grid(n, n, 128, 128, dev), mm))
        p2 = make(n - 64)
        t("whole", lambda: p2.block_mask(n - 64, n - 64, block_size=128, device="cuda"))
    rec[name] = {k: round(statistics.median(v), 4) for k, v in parts.items()}
    print(name, rec[name], flush=True)
    p = make(131072 - 4096)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        p.block_mask(131072 - 4096, 131072 - 4096, block_size=128, device="cuda")
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    rec[name + "_profile"] = table
    print(table, flush=True)
json.dump(rec, open(sys.argv[1], "w"), indent=1)
