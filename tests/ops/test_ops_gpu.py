"""CUDA backends in bf16 against the float64 reference.

Tolerance rule (as in FlashAttention's tests): a kernel's error against the float64 reference
may be at most ``K`` times the error of the plain ``math`` backend in the same dtype, plus a
small floor, with K = 2 for the output and 3 for gradients.
"""

import pytest
import torch

from attnkit.ops import BACKENDS, attention, attention_spec, select_backend

pytestmark = [pytest.mark.gpu]

K_OUT, K_GRAD, FLOOR = 2.0, 3.0, 1e-4
CUDA_BACKENDS = ["math", "flash", "cudnn", "efficient", "flex", "chunked"]

# (B, Hq, Hkv, Sq, Skv, D, causal): odd lengths, Sq != Skv, GQA.
SHAPES = {
    "hd64-1025": (2, 8, 8, 1025, 1025, 64, False),
    "hd128-causal-gqa": (2, 8, 2, 1000, 1000, 128, True),
    "hd64-causal-kv-cache": (1, 4, 4, 97, 1025, 64, True),
    "hd128-sq>skv-causal": (1, 4, 4, 300, 257, 128, True),
}


def _max_error(x, ref):
    return (x.float() - ref.float()).abs().max().item()


def _results(backend, q, k, v, causal):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, causal=causal, backend=backend)
    generator = torch.Generator(out.device).manual_seed(0)  # the same upstream gradient for every backend
    grad_out = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_backend_bf16_within_k_times_math_error(backend, shape):
    batch, heads_q, heads_kv, seq_q, seq_kv, dim, causal = SHAPES[shape]
    q = torch.randn(batch, heads_q, seq_q, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, heads_kv, seq_kv, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, heads_kv, seq_kv, dim, device="cuda", dtype=torch.bfloat16)
    reason = BACKENDS[backend].support(attention_spec(q.requires_grad_(), k, v, causal=causal))
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    reference = _results("reference", q.double(), k.double(), v.double(), causal)
    math = _results("math", q, k, v, causal)
    got = _results(backend, q, k, v, causal)
    for name, x, base, ref, k_factor in zip(["out", "dq", "dk", "dv"], got, math, reference, [K_OUT, K_GRAD, K_GRAD, K_GRAD]):
        limit = k_factor * _max_error(base, ref) + FLOOR
        assert _max_error(x, ref) <= limit, f"{name}: {_max_error(x, ref):.2e} > {limit:.2e}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dim", [64, 128])
def test_auto_runs_its_choice_on_cuda(dim, causal):
    q, k, v = (torch.randn(2, 8, 1024, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    choice = select_backend(attention_spec(q, k, v, causal=causal))
    assert choice.chosen in ("cudnn", "flash"), choice
    ref = attention(q.double(), k.double(), v.double(), causal=causal, backend="reference")
    assert _max_error(attention(q, k, v, causal=causal), ref) < 2e-2
