"""On a GPU: the fused kernels pass in fp16/bf16 and the planted faults still fail there."""

import pytest
import torch

from attnkit.ops import AttentionSpec
from attnkit.validate import ValidateConfig, check_attention, validate
from attnkit.validate.accuracy import accuracy_cases
from attnkit.validate.sites import AttentionLayer
from planted import FAULTS, TinyDecoder, tiny_inputs

FUSED = {name: name for name in ("flash", "efficient", "cudnn", "flex", "chunked", "math")}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal, mask, heads_kv", [(False, "none", 12), (True, "none", 4), (False, "bool", 12)])
def test_fused_kernels_pass_and_faults_fail_on_cuda(dtype, causal, mask, heads_kv):
    spec = AttentionSpec(batch=2, heads_q=12, heads_kv=heads_kv, seq_q=1025, head_dim=64, device="cuda", dtype=dtype, mask=mask, causal=causal)
    results = []
    for index, case in enumerate(accuracy_cases([AttentionLayer(["layer"], "sdpa", spec.to_json())], max_batch=2)):
        results += check_attention(case, {**FUSED, **FAULTS}, seed=index, device="cuda")
    for result in results:
        if result.backend in FUSED:
            assert result.status in ("pass", "skip"), (result.backend, result.case, result.reason)
    assert any(r.status == "fail" for r in results if r.backend == "scale_1/D")
    assert any(r.status == "fail" for r in results if r.backend == "zero_grad_k")


@pytest.mark.gpu
def test_validate_tiny_model_on_cuda_measures_memory():
    model = TinyDecoder().cuda()
    inputs = tuple(t.cuda() for t in tiny_inputs())
    report = validate(model, example_inputs=inputs, device="cuda", dtype="bf16", config=ValidateConfig.preset("quick", compile_backends=("inductor",)))
    assert report.passed, [(r.backend, r.case, r.reason) for r in report.failures]
    timed = [r for r in report.performance if r.status == "ok"]
    assert timed and all(r.clock == "cuda-events" and r.peak_mem_mb is not None for r in timed)


@pytest.mark.gpu
def test_a_cpu_built_model_and_inputs_follow_validate_to_the_gpu():
    """validate's default device is the GPU: a model and inputs built on the CPU (what users have) move with it."""
    model, (x, padding) = TinyDecoder(), tiny_inputs()
    report = validate(model, example_inputs=(x, padding), config=ValidateConfig.preset("quick", backends=("math", "flash")))
    assert report.environment.device == "cuda" and report.found_attention and report.accuracy
    assert x.device.type == "cpu" and padding.device.type == "cpu"  # the caller's tensors are left where they were
