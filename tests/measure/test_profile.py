"""profile_models plumbing on CPU with CUDA faked: one failure never hides the other records."""

import json

import pytest
import torch

import attnkit.measure.profile as profile_module
import attnkit.models as models
from attnkit.bench.timing import Timing
from attnkit.measure.profile import ProfileRecord



@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA calls answered on the CPU; the measurement is planted: 42 kernels, 1 ms, groups below."""
    build = models.build_model
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(models, "build_model", lambda name, **kw: build(name, **{**kw, "device": "cpu"}))
    monkeypatch.setattr(profile_module, "kernel_stats", lambda fn, iters=3, group=None: (fn(), (42.0, {"gemm": 0.6, "norm": 0.1}))[1])
    monkeypatch.setattr(profile_module, "time_fn", lambda fn, **kw: Timing(1.0, 1.0, 1.0, 1.0, 1, "fake"))
    monkeypatch.setattr(profile_module, "host_ms", lambda fn, **kw: 0.5)
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)


def test_failures_are_records_and_the_rest_is_measured(fake_gpu, monkeypatch):
    real_analyze = profile_module.analyze

    def analyze(model, *args, **kwargs):
        if kwargs.get("name") == "tests.cli.test_analyze_cli:tiny_bert" and args[0][0].shape[0] == 2:
            raise RuntimeError("Expected all tensors to be on the same device")
        return real_analyze(model, *args, **kwargs)

    monkeypatch.setattr(profile_module, "analyze", analyze)
    result = profile_module.profile_models(["tests.cli.test_analyze_cli:tiny_bert", "no-such-model"], batches=(1, 2),
                                           dtype=torch.float32, log=lambda line: None)
    by_key = {(r.model.split(":")[-1], r.batch, r.mode): r for r in result.records}
    assert len(by_key) == 8
    good = by_key["tiny_bert", 1, "eager"]
    assert good.predicted_kernels and good.measured_kernels == 42.0 and good.measured_host_ms == 0.5
    assert good.measured_groups_ms == {"gemm": 0.6, "norm": 0.1} and good.predicted_groups_ms
    assert set(good.group_errors()) >= {"host", "device", "gemm", "norm"}
    failed = by_key["tiny_bert", 2, "eager"]
    assert failed.predicted_kernels is None and "same device" in failed.note and failed.measured_kernels == 42.0
    assert all("failed" in by_key["no-such-model", b, m].note for b in (1, 2) for m in ("eager", "compiled"))
    json.dumps(result.to_json())


def test_group_errors_cover_host_device_and_each_group():
    record = ProfileRecord("vit", 64, "bfloat16", "eager", 125, 129.0, 6.3, 6.5, predicted_host_ms=5.0,
                           measured_host_ms=4.0, predicted_device_ms=6.3, measured_device_ms=6.3,
                           predicted_groups_ms={"gemm": 3.3, "norm": 0.7}, measured_groups_ms={"gemm": 3.0, "other": 0.1})
    errors = record.group_errors()
    assert errors["host"] == pytest.approx(0.25) and errors["device"] == pytest.approx(0.0)
    assert errors["gemm"] == pytest.approx(0.1) and errors["norm"] is None and errors["other"] == pytest.approx(-1.0)
    assert record.to_json()["group_errors"] == errors
