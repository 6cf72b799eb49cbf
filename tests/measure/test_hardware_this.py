"""The CPU profile: `calibrate` measures this CPU quickly, `--hardware this` caches it, and its predictions
match what a model measures on this machine."""

import importlib
import json
import time

import pytest
import torch
from typer.testing import CliRunner

from attnkit.analyze import analyze
from attnkit.measure import load_hardware
from attnkit.measure.calibrate_cpu import calibrate_cpu
from attnkit.analyze.cost import ModeCost
from attnkit.hardware.profiles import HardwareProfile
from attnkit.measure.this_machine import cache_path

calibrate_cpu_module = importlib.import_module("attnkit.measure.calibrate_cpu")  # the package attribute is the function

@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: its CPU time is its wall time on an idle machine, so neighbours on a shared CI
    machine do not enter the numbers (time.thread_time in calibration and in the measurement below)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cpu_profile(one_thread):
    start = time.perf_counter()
    profile = calibrate_cpu(log=lambda _: None)
    return profile, time.perf_counter() - start


def test_calibration_is_quick_and_complete(cpu_profile):
    profile, seconds = cpu_profile
    assert seconds < 60
    assert profile.kind == "cpu" and profile.launch_overhead_us == 0.0 and "1 threads" in profile.name
    assert profile.extra["threads"] == 1 and profile.extra["torch"] == torch.__version__
    for curve in (profile.gemm_tflops_by_size["fp32"], profile.attention_tflops_by_seq["fp32"]):
        assert len(curve) >= 4 and all(rate > 0 for _, rate in curve)
    assert set(profile.bandwidth_gbs_by_kind) == {"pointwise", "activation", "norm", "softmax", "reduction", "copy", "gather"}
    assert 0 < profile.host_view_us and 0 < profile.host_module_us and 0 < profile.host_launch_idle_us < 100
    assert HardwareProfile.from_json(json.loads(json.dumps(profile.to_json()))) == profile


def _bert(layers=4, hidden=384, seq=128):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=hidden // 64, intermediate_size=4 * hidden)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval(), (torch.randint(0, 1000, (1, seq)),)


def test_prediction_matches_this_cpu_within_25_percent(cpu_profile):
    """The calibrated rates are the ones a model sees: a 4-layer BERT (GEMMs, SDPA, norms, host dispatch)."""
    profile, _ = cpu_profile
    model, inputs = _bert()
    predicted = analyze(model, inputs, hardware=profile, modes=("eager",)).mode("eager").predicted_s
    with torch.no_grad():
        model(*inputs)
        samples = []
        for _ in range(5):
            start = time.thread_time()
            model(*inputs)
            samples.append(time.thread_time() - start)
    measured = min(samples)
    assert predicted == pytest.approx(measured, rel=0.25), f"predicted {predicted * 1e3:.1f} ms, measured {measured * 1e3:.1f} ms"


def test_cpu_latency_adds_host_to_device(cpu_profile):
    """One core dispatches and computes: no overlap on a CPU, the GPU overlap rule elsewhere."""
    costs = dict(mode="eager", num_kernels=1, total_flops=0, total_bytes=0, device_s=2e-3, host_s=1e-3,
                 host_busy_s=5e-4, kernels=())
    assert ModeCost(**costs, serial=True).predicted_s == pytest.approx(3e-3)
    assert ModeCost(**costs).predicted_s == pytest.approx(2e-3)
    model, inputs = _bert(layers=1, hidden=64, seq=8)
    mode = analyze(model, inputs, hardware=cpu_profile[0], modes=("eager",)).mode("eager")
    assert mode.predicted_s == pytest.approx(mode.device_s + mode.host_s)


def test_hardware_this_calibrates_once_then_reads_the_cache(cpu_profile, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = []
    monkeypatch.setattr(calibrate_cpu_module, "calibrate_cpu", lambda log: calls.append(1) or cpu_profile[0])
    first, second = load_hardware("this"), load_hardware("this")
    assert len(calls) == 1 and first == second and first.key == "this" and first.kind == "cpu"
    path = cache_path()
    assert path.parent == tmp_path / "attnkit" and path.name.startswith("hardware-cpu-") and "-1t-torch" in path.name
    assert json.loads(path.read_text())["name"] == cpu_profile[0].name
    torch.set_num_threads(2)
    try:  # another thread count is another machine
        assert cache_path() != path
    finally:
        torch.set_num_threads(1)


def test_calibrate_cli_on_cpu(cpu_profile, monkeypatch, tmp_path):
    from attnkit.cli.main import app

    monkeypatch.setattr(calibrate_cpu_module, "calibrate_cpu", lambda log: cpu_profile[0])
    out = tmp_path / "cpu.json"
    result = CliRunner().invoke(app, ["calibrate", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_hardware(str(out)).kind == "cpu"


def test_the_fixed_cpu_profile_says_what_it_is():
    profile = load_hardware("cpu")
    assert "16 cores" in profile.name and profile.kind == "cpu"
