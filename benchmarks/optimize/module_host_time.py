"""Host microseconds per call of BERT-128's layer-0 attention modules and of the whole model (batch 1, bf16):
eager vs ``optimize``'s rewrite, calls issued back to back (best of 9 rounds, 3 alternating passes), one attnkit
tree per process (it runs on wave 1's tree too; ``cpu`` as a third argument: a smoke test).

    PYTHONPATH=/tmp/wave1/src taskset -c 3 python benchmarks/optimize/module_host_time.py wave1 $OUT/wave1.json
    PYTHONPATH=src taskset -c 3 python benchmarks/optimize/module_host_time.py now $OUT/now.json
"""

import json
import sys
import time
import torch
from attnkit.models import build_model
from attnkit.optimize import OptimizeConfig, optimize

label, out = sys.argv[1], sys.argv[2]
DEV = sys.argv[3] if len(sys.argv) > 3 else "cuda"


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


zoo = build_model("bert-base", batch_size=1, seq_len=128, dtype=torch.bfloat16, device=DEV)
model, inputs, kwargs = zoo.model.eval(), zoo.example_inputs, zoo.example_kwargs
rw, _ = optimize(model, inputs, example_kwargs=kwargs, config=OptimizeConfig(dtype=torch.bfloat16, check=False, measure=False))
hs = torch.randn(1, 128, 768, device=DEV, dtype=torch.bfloat16)


def best_us(f, calls=300, rounds=9):
    b = []
    for _ in range(rounds):
        _sync()
        s = time.perf_counter()
        for _ in range(calls):
            f()
        _sync()
        b.append((time.perf_counter() - s) / calls * 1e6)
    return min(b)


rec = {"label": label, "torch": torch.__version__, "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "us": {}}
targets = {
    "layer.0.attention.self": lambda m: (lambda mod=m.get_submodule("encoder.layer.0.attention.self"): mod(hs)),
    "layer.0.attention": lambda m: (lambda mod=m.get_submodule("encoder.layer.0.attention"): mod(hs)),
    "layer.0": lambda m: (lambda mod=m.get_submodule("encoder.layer.0"): mod(hs)),
    "model": lambda m: (lambda: m(*inputs, **kwargs)),
}
with torch.inference_mode():
    for name, make in targets.items():
        fns = {"eager": make(model), "rewrite": make(rw)}
        for f in fns.values():
            for _ in range(30):
                f()
        res = {k: [] for k in fns}
        for r in range(3):
            for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                res[k].append(best_us(fns[k], calls=300 if name != "model" else 40))
        rec["us"][name] = {k: round(min(v), 2) for k, v in res.items()}
        print(label, name, rec["us"][name], flush=True)
json.dump(rec, open(out, "w"), indent=1)
