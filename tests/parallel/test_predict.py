"""The context-parallel cost model: its counts on a small hand-computed case, its scaling, its
checks, and its predictions against the committed 2- and 4-GPU H200 measurements (no GPU needed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from attnkit.errors import InvalidArgumentError
from attnkit.hardware import stored_profile
from attnkit.ops.spec import AttentionSpec
from attnkit.parallel import CPHardware, predict_cp_time

_ROOT = Path(__file__).resolve().parents[2]
_RESULTS = _ROOT / "benchmarks" / "results" / "parallel"
_FILES = [_RESULTS / f"parallel-nvidia-h200-{w}gpu-2026-11-27.json" for w in (2, 4)]
_GOAL = 0.25
"""Issue 10: predicted per-rank time within 25% of measured."""
_REACHED = 0.10
"""What the model reaches on the committed files (largest error 5.6%, 4-GPU ring at 128k)."""


def _spec(seq, heads=16, heads_kv=None, dim=128, batch=1, causal=True, dtype=torch.bfloat16):
    return AttentionSpec(batch, heads, seq, dim, heads_kv=heads_kv or heads, causal=causal, dtype=dtype)


# 1 TFLOP/s, 1 GB/s link, 1 GB/s memory, no overhead: times are counts in convenient units.
_UNIT = CPHardware(attention_tflops=((1, 1.0),), link_gbs=1.0, memory_gbs=1.0, step_overhead_us=0.0)


def test_ring_counts_a_small_case_by_hand():
    # B1 H2 S8 D4 bf16 causal on 2 ranks: S_local = 4, zigzag chunks of 2.
    p = predict_cp_time(_spec(8, heads=2, dim=4), "ring", 2, _UNIT)
    # causal forward 2*B*H*S*S*(D+Dv)/2 = 2*1*2*8*8*8/2 = 1024 FLOPs, half per rank, x3.5 with backward
    assert p.flops == pytest.approx(3.5 * 1024 / 2)
    # forward: one K/V block (1*2*4*(4+4) bf16 = 128 B); backward: it again, plus the other rank's
    # dK/dV share coming home after the last step: one share, so bf16 (128 B)
    assert p.link_bytes == 128 + 128 + 128
    assert p.link_ms == pytest.approx(1e3 * 384 / 1e9)
    # on 4 ranks sums of two or more shares travel in float32 (256 B): after steps 2 and 3
    four = predict_cp_time(_spec(16, heads=2, dim=4), "ring", 4, _UNIT)
    assert four.link_bytes == 3 * 128 + 3 * 128 + 128 + 256 + 256  # K/V 3 hops each way; sums after steps 1, 2, 3
    assert p.compute_ms == pytest.approx(1e3 * p.flops / 1e12)
    assert p.hidden_ms == 0.0 and p.overhead_ms == 0.0  # overlap 0 by default
    assert p.total_ms == pytest.approx(p.compute_ms + p.link_ms + p.memory_ms)


def test_ulysses_counts_its_four_exchanges_and_the_hybrid_nine():
    # B1 H2 S8 D4 bf16 on 2 ranks: 4 tokens a rank; q, k, v, out, grad_out, dq, dk, dv 64 B each, lse 32 B (fp32)
    p = predict_cp_time(_spec(8, heads=2, dim=4), "ulysses", 2, _UNIT)
    assert p.link_bytes == 8 * 64 / 2  # each rank sends (W-1)/W of every tensor; no lse
    assert p.flops == pytest.approx(3.5 * 1024 / 2)
    assert p.memory_ms == pytest.approx(1e3 * 4 * 8 * 64 / 1e9)  # two reorder copies per tensor
    ring_only = predict_cp_time(_spec(8, heads=2, dim=4), "ring", 1, _UNIT)
    hybrid = predict_cp_time(_spec(8, heads=2, dim=4), "hybrid", 2, _UNIT, ulysses_size=2)
    assert hybrid.link_bytes == (8 * 64 + 32) / 2 + ring_only.link_bytes  # one exchange per tensor, lse included


def test_ulysses_with_fewer_kv_heads_than_ranks_sends_one_kv_head_per_peer():
    gqa = predict_cp_time(_spec(64, heads=8, heads_kv=2, dim=4), "ulysses", 4, _UNIT)
    four = predict_cp_time(_spec(64, heads=8, heads_kv=4, dim=4), "ulysses", 4, _UNIT)
    assert gqa.link_bytes == four.link_bytes  # 2 KV heads go out as 4 (one per rank), as ulysses.py does
    assert gqa.flops == four.flops


@pytest.mark.parametrize("method, extra", [("ring", {}), ("ulysses", {}), ("hybrid", {"ulysses_size": 2})])
def test_compute_scales_as_s_squared_and_splits_over_ranks(method, extra):
    base = predict_cp_time(_spec(32768), method, 4, _UNIT, **extra)
    longer = predict_cp_time(_spec(65536), method, 4, _UNIT, **extra)
    assert longer.compute_ms == pytest.approx(4 * base.compute_ms)
    assert longer.link_bytes == pytest.approx(2 * base.link_bytes)  # communication grows as S
    more = predict_cp_time(_spec(32768), method, 8, _UNIT, **({"ulysses_size": 4} if extra else {}))
    assert more.compute_ms == pytest.approx(base.compute_ms / 2)
    assert more.flops == pytest.approx(_spec(32768).flops(backward=True) / 8)


def test_zigzag_balances_causal_work_and_contiguous_does_not():
    zigzag = predict_cp_time(_spec(32768), "ring", 4, _UNIT)
    contiguous = predict_cp_time(_spec(32768), "ring", 4, _UNIT, layout="contiguous")
    assert zigzag.flops == pytest.approx(_spec(32768).flops(backward=True) / 4)
    # the slowest contiguous rank (the last): a causal diagonal and 3 full blocks, 3.5 S_local^2 against 2
    assert contiguous.flops == pytest.approx(1.75 * zigzag.flops)


def test_overlap_hides_the_shorter_of_compute_and_transfer():
    hidden = CPHardware(attention_tflops=((1, 500.0),), overlap=1.0)
    serial = CPHardware(attention_tflops=((1, 500.0),), overlap=0.0)
    a, b = (predict_cp_time(_spec(32768), "ring", 4, hw) for hw in (hidden, serial))
    assert a.compute_ms == b.compute_ms and a.link_ms == b.link_ms
    # compute is the longer part of every step here, so every transfer but the last dK/dV one hides
    last = 1e3 * 2 * 16 * 8192 * 128 * 4 / 350e9
    assert a.hidden_ms == pytest.approx(a.link_ms - last)
    assert a.total_ms == pytest.approx(b.total_ms - a.hidden_ms)


def test_calibration_reproduces_the_measured_point():
    hw = CPHardware.calibrated(_spec(131072), 468.7)
    assert hw.attention_rate(131072) == pytest.approx(_spec(131072).flops(backward=True) / 0.4687)
    assert hw.attention_rate(4096) == hw.attention_rate(131072)  # one point: flat
    # with a profile's sequence curve (H100: rises up to 2048 keys), scaled through the measured point
    curved = CPHardware.calibrated(_spec(131072), 468.7, profile=stored_profile("h100"))
    assert curved.attention_rate(131072) == pytest.approx(hw.attention_rate(131072))
    assert curved.attention_rate(512) < curved.attention_rate(2048) == pytest.approx(hw.attention_rate(131072))
    assert curved.memory_gbs == stored_profile("h100").achievable_bandwidth_gbs


def test_from_profile_takes_the_profile_rate():
    profile = stored_profile("h200")
    hw = CPHardware.from_profile(profile, torch.bfloat16)
    assert hw.attention_rate(65536) == pytest.approx(profile.attention_rate(torch.bfloat16))
    assert hw.memory_gbs == profile.achievable_bandwidth_gbs


@pytest.mark.parametrize(
    "call, parameter",
    [
        (lambda: predict_cp_time(_spec(4096), "allgather", 2, _UNIT), "method"),
        (lambda: predict_cp_time(_spec(4096), "hybrid", 4, _UNIT), "ulysses_size"),
        (lambda: predict_cp_time(_spec(4096), "hybrid", 4, _UNIT, ulysses_size=3), "ulysses_size"),
        (lambda: predict_cp_time(_spec(4096), "ring", 2, _UNIT, ulysses_size=2), "ulysses_size"),
        (lambda: predict_cp_time(_spec(4098), "ring", 2, _UNIT), "spec.seq_q"),
        (lambda: predict_cp_time(_spec(4096, heads=6), "ulysses", 4, _UNIT), "spec.heads_q"),
        (lambda: predict_cp_time(_spec(4096), "ring", 0, _UNIT), "world_size"),
        (lambda: CPHardware(attention_tflops=((1, 1.0),), overlap=1.5), "overlap"),
        (lambda: CPHardware(attention_tflops=((4096, 1.0), (1024, 2.0))), "attention_tflops"),
        (lambda: CPHardware(attention_tflops=((1, 1.0),), link_gbs=0), "link_gbs"),
    ],
)
def test_bad_arguments_name_the_parameter(call, parameter):
    with pytest.raises(InvalidArgumentError) as caught:
        call()
    assert caught.value.parameter == parameter


# ---------------------------------------------------------------- the committed measurements


def _cells(path: Path, **fields):
    """``(label, measured ms, predicted ms)`` of every attnkit ring / Ulysses / hybrid cell, calibrated on
    the file's one-GPU cuDNN time at 128k (H200 profile for the memory bandwidth)."""
    record = json.loads(path.read_text())
    shape, world_size = record["shape"], record["world_size"]

    def spec(seq):
        return _spec(seq, heads=shape["heads"], heads_kv=shape["heads_kv"], dim=shape["dim"], batch=shape["batch"])

    one_gpu = {r["seq"]: r["ms"] for r in record["results"] if r["method"] == "one-gpu cudnn"}
    hw = CPHardware.calibrated(spec(131072), one_gpu[131072], profile=stored_profile("h200"), **fields)
    cells = []
    for r in record["results"]:
        method = r["method"]
        if "ms" not in r or not (method in ("attnkit ring", "attnkit ulysses") or method.startswith("attnkit hybrid")):
            continue
        if method.startswith("attnkit hybrid"):
            extra = {"ulysses_size": int(method.split()[-1].split("x")[0])}
            predicted = predict_cp_time(spec(r["seq"]), "hybrid", world_size, hw, **extra)
        else:
            predicted = predict_cp_time(spec(r["seq"]), method.split()[1], world_size, hw)
        cells.append((f"{world_size} GPUs {method} {r['seq']}", r["ms"], predicted.total_ms))
    return cells


def test_every_committed_cell_is_predicted_within_the_goal():
    cells = [cell for path in _FILES for cell in _cells(path)]
    assert len(cells) == 16  # 2 GPUs: ring, Ulysses x 3 lengths; 4 GPUs: ring x 5, hybrid 2x2 x 3, Ulysses x 2
    errors = {label: predicted / measured - 1 for label, measured, predicted in cells}
    assert all(abs(e) <= _GOAL for e in errors.values()), errors
    assert max(abs(e) for e in errors.values()) <= _REACHED, errors


def test_full_overlap_misses_the_short_ring_the_measurements_show_serialized():
    """The evidence for ``overlap=0``: hiding every transfer predicts the 4-GPU 32k ring 20% fast."""
    hidden = {label: predicted / measured - 1 for label, measured, predicted in _cells(_FILES[1], overlap=1.0)}
    serial = {label: predicted / measured - 1 for label, measured, predicted in _cells(_FILES[1])}
    assert hidden["4 GPUs attnkit ring 32768"] < -0.15
    assert abs(serial["4 GPUs attnkit ring 32768"]) < 0.05


def test_the_benchmark_table_prints_predicted_next_to_measured():
    spec = importlib.util.spec_from_file_location("parallel_benchmark_run_predict", _ROOT / "benchmarks" / "parallel" / "run.py")
    run = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = run
    spec.loader.exec_module(run)
    record = json.loads(_FILES[1].read_text())
    calibration, predicted = run.predictions(record)
    assert "131072" in calibration and len(predicted) == 10
    expected = {(int(label.split()[-1]), " ".join(label.split()[2:-1])): ms for label, _, ms in _cells(_FILES[1])}
    assert predicted == pytest.approx(expected)
    text = run.table(record)
    assert "| method | length | measured | predicted | error |" in text
    assert "| attnkit ring | 2M | 30417.4 ms | 30002.5 ms | -1.4% |" in text
