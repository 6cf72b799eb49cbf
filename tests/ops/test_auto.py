"""`auto` follows the one rule table; `select_backend` explains every rejection."""

import dataclasses
import warnings

import pytest
import torch

from attnkit.errors import UnsupportedError
from attnkit.ops import BACKENDS, RULES, AttentionSpec, attention, attention_spec, backend_support, clear_caches, sdpa, select_backend


def test_every_rule_names_known_backends():
    for rule in RULES:
        assert set(rule.order) <= set(BACKENDS), rule


def test_cpu_prefers_flash_and_falls_back_when_it_cannot():
    spec = AttentionSpec(batch=1, heads_q=4, seq_q=64, head_dim=32)
    assert select_backend(spec).chosen == "flash"
    choice = select_backend(AttentionSpec(batch=1, heads_q=4, seq_q=64, head_dim=32, need_lse=True))
    assert choice.chosen == "math"
    assert "log-sum-exp" in choice.rejected["flash"]
    assert "reference" not in choice.candidates
    assert "chosen='math'" in repr(choice) and "flash: the log-sum-exp comes only from the CUDA kernels" in repr(choice)


def test_cuda_order_follows_measurements_and_support():
    spec = AttentionSpec(batch=1, heads_q=16, seq_q=4096, head_dim=128, device="cuda", dtype=torch.bfloat16)
    assert select_backend(spec).candidates[:3] == ("cudnn", "flash", "efficient")
    masked = AttentionSpec(batch=1, heads_q=16, seq_q=4096, head_dim=128, device="cuda", dtype=torch.bfloat16, mask="bool")
    assert select_backend(masked).chosen == "cudnn"  # an additive bias; 2.4x faster than efficient at BERT-512 (optimize run)
    grad_bias = AttentionSpec(batch=1, heads_q=16, seq_q=4096, head_dim=128, device="cuda", dtype=torch.bfloat16, mask="additive", mask_requires_grad=True)
    assert select_backend(grad_bias).chosen == "efficient"  # cuDNN gives the bias no gradient
    support = backend_support(AttentionSpec(batch=1, heads_q=4, seq_q=8, head_dim=8, device="cuda"))
    assert support["reference"] is None and "needs dtype float16 or bfloat16, got float32" in support["flash"]


@pytest.mark.parametrize("native", [False, True])
def test_grouped_calls_rank_cudnn_first_only_where_its_gqa_is_native(native, monkeypatch):
    """Without native GQA cuDNN would need K/V repeated per query head, so flash (GQA native) goes first."""
    monkeypatch.setattr(sdpa, "_native_gqa", native)
    select_backend.cache_clear()
    try:
        grouped = AttentionSpec(batch=1, heads_q=16, heads_kv=4, seq_q=4096, head_dim=128, device="cuda", dtype=torch.bfloat16)
        assert select_backend(grouped).candidates[:2] == (("cudnn", "flash") if native else ("flash", "cudnn"))
    finally:
        select_backend.cache_clear()


def test_cudnn_gqa_probe_runs_with_autograd_outside_the_callers_modes(monkeypatch):
    """optimize asks under inference mode, analyze under a fake-tensor mode: the probe (real CUDA tensors,
    a backward) must still run as an eager training call would, or its False would stick for the process."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    seen = []
    monkeypatch.setattr(sdpa, "_native_gqa", None)
    monkeypatch.setattr(sdpa, "_probe_cudnn_gqa", lambda: seen.append(
        (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch._C._len_torch_dispatch_stack())) or True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with torch.inference_mode(), FakeTensorMode():
        assert sdpa.cudnn_native_gqa() is True
    assert seen == [(True, False, 0)]
    assert sdpa.cudnn_native_gqa() is True and len(seen) == 1  # asked once per process


def test_auto_matches_its_choice():
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 11, 16), torch.randn(1, 2, 11, 16)
    chosen = select_backend(attention_spec(q, k, v, causal=True)).chosen
    torch.testing.assert_close(attention(q, k, v, causal=True), attention(q, k, v, causal=True, backend=chosen), rtol=0, atol=0)


def test_flops_convention():
    spec = AttentionSpec(batch=2, heads_q=3, seq_q=5, seq_kv=7, head_dim=8)
    assert spec.flops() == 4 * 2 * 3 * 5 * 7 * 8
    causal = AttentionSpec(batch=2, heads_q=3, seq_q=5, seq_kv=7, head_dim=8, causal=True)
    assert causal.flops(backward=True) == 3.5 * spec.flops() / 2


def test_auto_falls_back_when_a_kernel_refuses_at_run_time(monkeypatch):
    # Pretend the static rules missed flash's D == Dv requirement: the kernel itself refuses.
    monkeypatch.setitem(BACKENDS, "flash", dataclasses.replace(BACKENDS["flash"], support=lambda spec: None))
    clear_caches()
    try:
        q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 4)
        out = attention(q, k, v)
        torch.testing.assert_close(out, attention(q, k, v, backend="reference"))
        spec, layout = attention_spec(q, k, v), (q.stride(), k.stride(), v.stride())
        assert select_backend(spec, layout).chosen == "math"
        assert "flash kernel refused" in backend_support(spec, layout)["flash"]
    finally:
        clear_caches()


def test_one_odd_layout_does_not_change_the_choice_for_other_calls(monkeypatch):
    """A kernel refusing a strided call is remembered for that layout only (issue 8, point 9)."""
    flash = BACKENDS["flash"]
    ran = []

    def contiguous_only(q, k, v, options):
        if not q.is_contiguous():
            raise UnsupportedError("flash kernel refused: pretend it needs contiguous q")
        ran.append("flash")
        return flash.fn(q, k, v, options)

    monkeypatch.setitem(BACKENDS, "flash", dataclasses.replace(flash, fn=contiguous_only))
    clear_caches()
    try:
        q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
        strided = torch.randn(1, 6, 2, 8).transpose(1, 2)  # same shape, another layout
        torch.testing.assert_close(attention(strided, k, v), attention(strided, k, v, backend="reference"))
        assert ran == []  # flash refused; math ran
        attention(q, k, v)
        attention(strided, k, v)
        assert ran == ["flash"]  # the contiguous call still runs flash; the strided one does not retry it
        assert backend_support(attention_spec(q, k, v))["flash"] is None
    finally:
        clear_caches()


def test_cpu_auto_rule_follows_the_cpu_measurement():
    """benchmarks/results/attention-cpu-2026-11-27.json: math wins short bf16 calls, flash from S512 on and in fp32."""
    def spec(seq, dtype, grad):
        return AttentionSpec(batch=4, heads_q=8, seq_q=seq, head_dim=64, dtype=dtype, requires_grad=grad)

    for grad in (False, True):
        assert select_backend(spec(128, torch.bfloat16, grad)).chosen == "math"
        assert select_backend(spec(256, torch.bfloat16, grad)).chosen == ("flash" if grad else "math")
        assert select_backend(spec(512, torch.bfloat16, grad)).chosen == "flash"
        assert select_backend(spec(128, torch.float32, grad)).chosen == "flash"


@pytest.mark.parametrize(
    ("head_dim", "seq", "causal", "grad", "expected"),
    [
        (128, 1024, True, False, "cudnn"),
        (128, 2048, True, False, "cudnn"),
        (64, 1024, True, False, "cudnn"),
        (128, 1024, False, False, "cudnn"),
        (128, 1024, True, True, "cudnn"),
    ],
)
def test_cuda_rule_table_follows_measured_ordering(head_dim, seq, causal, grad, expected):
    rule = next(rule for rule in RULES if rule.matches(_cuda_spec(head_dim, seq, causal, grad)))
    assert rule.order[0] == expected, rule


def _cuda_spec(head_dim, seq, causal, grad):
    return AttentionSpec(
        batch=2, heads_q=8, seq_q=seq, head_dim=head_dim, device="cuda", dtype=torch.bfloat16, causal=causal, requires_grad=grad
    )


def test_small_cuda_inference_calls_rank_the_lightest_binding_first(monkeypatch):
    """Up to S128 and B*H = 768 (BERT-128 at batch 64) the efficient kernel, the cheapest to issue, goes first
    (benchmarks/results/optimize/host-cpu-time-bert128-nvidia-h100-2026-11-28-session9-run4.json); a larger
    batch, a longer sequence, a causal or a training call, or a call being compiled keep the GPU-time order."""

    def spec(batch, seq=128, **kw):
        return AttentionSpec(batch=batch, heads_q=12, seq_q=seq, head_dim=64, device="cuda", dtype=torch.bfloat16, **kw)

    first = lambda s: next(rule for rule in RULES if rule.matches(s)).order[0]  # noqa: E731
    assert first(spec(1)) == first(spec(8)) == first(spec(64)) == first(spec(2, mask="bool")) == "efficient"
    assert first(spec(65)) == first(spec(1, seq=129)) == first(spec(1, causal=True)) == first(spec(1, requires_grad=True)) == "cudnn"
    assert first(spec(1, heads_kv=4)) != "efficient"  # grouped: efficient would repeat K/V
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert first(spec(1)) == "cudnn"
