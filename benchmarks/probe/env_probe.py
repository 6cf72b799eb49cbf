"""One-off probe of the GPU machine: versions, SDPA backends, and where torchvision ViT-B/16 spends time.

Usage: python benchmarks/probe/env_probe.py --out DIR
"""
import argparse, json, platform, sys, time, datetime
import torch

p = argparse.ArgumentParser(); p.add_argument("--out", default="."); args = p.parse_args()
rec = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
       "python": platform.python_version(), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
for mod in ("torchvision", "transformers", "triton"):
    try:
        rec[mod] = __import__(mod).__version__
    except Exception as e:  # report, don't crash
        rec[mod] = f"no: {e}"
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F
q = torch.randn(2, 8, 256, 128, device="cuda", dtype=torch.bfloat16)
sd = {}
for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
    try:
        with sdpa_kernel([b]):
            F.scaled_dot_product_attention(q, q, q)
        sd[b.name] = "yes"
    except Exception as e:
        sd[b.name] = f"no: {str(e)[:100]}"
rec["sdpa"] = sd
# ViT-B/16 timing split
import torchvision
from torch.profiler import profile, ProfilerActivity
def bench(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize(); s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n): fn()
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e) / n
res = {}
for name in ("vit_b_16",):
    m = getattr(torchvision.models, name)(weights=None).cuda().eval().to(torch.bfloat16)
    x = torch.randn(64, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ms = bench(lambda: m(x)); res[f"{name}_eager_b64_ms"] = ms; res[f"{name}_eager_b64_img_s"] = 64 / ms * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m(x); torch.cuda.synchronize()
        rows = []
        for ev in prof.key_averages():
            if ev.device_type.name == "CUDA" or getattr(ev, "self_device_time_total", 0) > 0:
                rows.append((ev.key[:90], getattr(ev, "self_device_time_total", 0) / 1e3, ev.count))
        rows.sort(key=lambda r: -r[1]); res[f"{name}_top_kernels"] = rows[:25]
        # batch 1 fp32 kernel count
        m32 = getattr(torchvision.models, name)(weights=None).cuda().eval()
        x1 = torch.randn(1, 3, 224, 224, device="cuda")
        m32(x1); torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m32(x1); torch.cuda.synchronize()
        res[f"{name}_fp32_b1_kernels"] = sum(ev.count for ev in prof.key_averages() if getattr(ev, "self_device_time_total", 0) > 0)
        res[f"{name}_fp32_b1_ms"] = bench(lambda: m32(x1))
rec["vit"] = res
print(json.dumps(rec, indent=1))
json.dump(rec, open(f"{args.out}/env_probe.json", "w"), indent=1)
