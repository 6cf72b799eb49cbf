"""benchmarks/parallel/run.py decides which cells of a one-shot GPU run to start: these check its
plan, its (S/S0)^2 time and S/S0 memory estimates, the skip reasons, the extrapolated ideal, the
table, and the float64 reference its accuracy section measures against (all on CPU, no ranks).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "parallel" / "run.py"


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location("parallel_benchmark_run", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.DEVICE = "cpu"
    return module


def _bench(run, *argv, world_size=4, hybrids=("2x2",)):
    args = run._args(["--device", "cpu", *argv])
    args.heads_kv = args.heads_kv or args.heads
    return run.Bench(args, 0, world_size, {f"attnkit hybrid {h}": None for h in hybrids})


def _measured(ms: float, seconds: float, peak: float = 10.0, warmup: int = 1, repeats: int = 2) -> dict:
    return {"ms": ms, "min_ms": ms, "peak_gib": peak, "seconds": seconds, "warmup": warmup, "repeats": repeats}


def test_plan_runs_core_cells_first_and_only_long_methods_at_long_lengths(run):
    bench = _bench(run, "--lengths", "32768,131072,524288,1048576,2097152")
    plan = bench.plan([32768, 131072, 524288, 1048576, 2097152])
    core = {"one-gpu cudnn", "attnkit ring", "torch cp cudnn allgather"}
    first_other = next(i for i, (_, m) in enumerate(plan) if m not in core)
    assert all(m in core for _, m in plan[:first_other]) and all(m not in core for _, m in plan[first_other:])
    assert [s for s, m in plan if m == "attnkit ring"] == [32768, 131072, 524288, 1048576, 2097152]
    assert {m for s, m in plan if s >= 1048576} == {"attnkit ring", "torch cp cudnn allgather"}
    assert max(s for s, m in plan if m == "one-gpu cudnn") == 524288  # --max-one-gpu-length
    assert max(s for s, m in plan if m in ("one-gpu flash", "torch cp flash alltoall")) == 131072
    assert ("attnkit hybrid 2x2", 524288) in {(m, s) for s, m in plan}


def test_time_estimate_scales_calls_by_length_squared_and_budget_skips(run):
    bench = _bench(run, "--budget-s", "300")
    bench.cells[(1048576, "attnkit ring")] = _measured(ms=8000.0, seconds=26.0)  # 3 calls = 24 s + 2 s fixed
    estimate = bench.estimate_s(2097152, "attnkit ring")
    assert estimate == pytest.approx(2.0 + 3 * 8.0 * 4)  # 1 warm-up + 2 timed at 4x the time each
    assert bench.skip_reason(2097152, "attnkit ring", elapsed=200.0) is None
    reason = bench.skip_reason(2097152, "attnkit ring", elapsed=250.0)
    assert reason.startswith("budget: estimated 98.0 s would end at 348.0 s")


def test_memory_and_earlier_failures_skip(run):
    bench = _bench(run)
    bench.memory_gib = 80.0
    bench.cells[(1048576, "torch cp cudnn allgather")] = _measured(ms=8000.0, seconds=26.0, peak=45.0)
    assert bench.skip_reason(2097152, "torch cp cudnn allgather", elapsed=0.0).startswith("memory: predicted peak 90 GiB")
    bench.cells[(32768, "attnkit ulysses")] = {"error": "RuntimeError: boom (ranks 0, 1)"}
    assert bench.skip_reason(131072, "attnkit ulysses", elapsed=0.0) == "failed at 32768"


def test_ideal_is_measured_or_extrapolated_and_flagged(run):
    bench = _bench(run)
    bench.cells[(524288, "one-gpu cudnn")] = _measured(ms=7500.0, seconds=25.0)
    bench.cells[(524288, "attnkit ring")] = _measured(ms=2000.0, seconds=7.0)
    bench.cells[(2097152, "attnkit ring")] = _measured(ms=32000.0, seconds=99.0)
    bench.cells[(2097152, "torch cp cudnn allgather")] = {"skipped": "memory: predicted peak 90 GiB"}
    rows = {(r["seq"], r["method"]): r for r in bench.rows()}
    assert rows[(524288, "attnkit ring")]["ideal"] == "measured"
    assert rows[(524288, "attnkit ring")]["pct_of_ideal"] == pytest.approx(100 * 7500 / 4 / 2000)
    far = rows[(2097152, "attnkit ring")]
    assert far["ideal"] == "extrapolated (S^2 from 524288)"
    assert far["ideal_ms"] == pytest.approx(7500 * 16 / 4) and far["pct_of_ideal"] == pytest.approx(100 * 30000 / 32000)
    record = {"world_size": 4, "device": "cpu", "torch": "x", "date": "d", "shape": {"batch": 1, "heads": 16, "heads_kv": 16, "dim": 128}, "results": list(rows.values())}
    text = run.table(record)
    assert "93.8%* (32.00 s)" in text and "skipped (memory)" in text and "2M: extrapolated (S^2 from 524288)" in text


def test_unknown_row_names_stop_the_run_before_it_starts(run):
    with pytest.raises(SystemExit, match="unknown rows"):
        _bench(run, "--long-methods", "attnkit ring,torch cp cudnn")


def test_reference_is_the_float64_attention_and_its_gradients(run):
    generator = torch.Generator().manual_seed(0)
    full = {name: torch.randn(1, heads, 24, 8, generator=generator) for name, heads in (("q", 4), ("k", 2), ("v", 2), ("grad", 4))}
    ref = run._reference(full)
    q, k, v = (full[name].double().requires_grad_(True) for name in "qkv")
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.backward(full["grad"].double())
    for name, expected in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.allclose(ref[name], expected, rtol=0, atol=1e-12), name
    assert not math.isclose(ref["dk"].abs().max().item(), 0.0)
