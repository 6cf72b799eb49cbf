"""attention() on CUDA: the fused kernels' log-sum-exp (with its gradient), positions, masks, NaN, empty batch.

Tolerance rule as in test_ops_gpu.py: error against float64 <= K x the plain bf16 ``math`` error + floor.
"""

import pytest
import torch

from attnkit.ops import BACKENDS, attention, attention_spec, select_backend

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]

K_OUT, K_GRAD, FLOOR = 2.0, 3.0, 1e-4
FUSED = ["flash", "cudnn", "efficient"]
# (B, Hq, Hkv, Sq, Skv, D, causal)
SHAPES = {"square-causal-gqa": (2, 8, 2, 257, 257, 64, True), "kv-longer-causal": (1, 4, 4, 97, 300, 128, True), "cross": (2, 4, 4, 65, 130, 64, False)}


def _err(x, ref):
    finite = torch.isfinite(ref)
    return (x.double() - ref)[finite].abs().max().item()


def _qkv(b, hq, hkv, sq, skv, d, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    return [torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16) for s in ((b, hq, sq, d), (b, hkv, skv, d), (b, hkv, skv, d))]


def _lse_results(backend, q, k, v, grad_out, grad_lse, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention(*leaves, return_lse=True, backend=backend, **options)
    loss = (out.double() * grad_out.double()).sum() + (lse.double() * grad_lse.double()).sum()
    return [out.detach(), lse.detach(), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", [*FUSED, "auto"])
def test_fused_lse_and_its_gradient(backend, shape):
    b, hq, hkv, sq, skv, d, causal = SHAPES[shape]
    q, k, v = _qkv(b, hq, hkv, sq, skv, d)
    spec = attention_spec(q.requires_grad_(), k, v, causal=causal, return_lse=True)
    if backend != "auto" and (reason := BACKENDS[backend].support(spec)) is not None:
        pytest.skip(reason)
    if backend == "auto":
        assert select_backend(spec).chosen in FUSED, select_backend(spec)  # no longer forced to chunked
    g = torch.Generator("cuda").manual_seed(1)
    grad_out = torch.randn(b, hq, sq, d, generator=g, device="cuda", dtype=torch.bfloat16)
    grad_lse = torch.randn(b, hq, sq, generator=g, device="cuda")
    ref = _lse_results("reference", q.double(), k.double(), v.double(), grad_out, grad_lse, causal=causal)
    math = _lse_results("math", q, k, v, grad_out, grad_lse, causal=causal)
    got = _lse_results(backend, q, k, v, grad_out, grad_lse, causal=causal)
    for name, x, base, r, kf in zip(["out", "lse", "dq", "dk", "dv"], got, math, ref, [K_OUT, K_OUT, K_GRAD, K_GRAD, K_GRAD]):
        assert x.dtype == (torch.float32 if name == "lse" else torch.bfloat16), name
        limit = kf * _err(base, r) + FLOOR
        assert _err(x, r) <= limit, f"{backend} {name}: {_err(x, r):.2e} > {limit:.2e}"


@pytest.mark.parametrize("backend", ["auto", "math", "chunked", "flex", *FUSED])
@pytest.mark.parametrize(("q_rows", "kv_cols"), [((256, 384), (0, 384)), ((128, 256), (128, 256)), ((64, 192), (0, 256))])
def test_shard_positions_on_cuda(backend, q_rows, kv_cols):
    q, k, v = _qkv(1, 4, 2, 384, 384, 64, seed=2)
    (q0, q1), (k0, k1) = q_rows, kv_cols
    args = (q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1])
    spec = attention_spec(*args, causal=True, q_start=q0, kv_start=k0)
    if backend != "auto" and (reason := BACKENDS[backend].support(spec)) is not None:
        pytest.skip(reason)
    got = attention(*args, causal=True, q_start=q0, kv_start=k0, backend=backend)
    keys = torch.zeros(384, dtype=torch.bool, device="cuda")
    keys[k0:k1] = True
    ref = attention(q.double(), k.double(), v.double(), mask=keys.expand(384, 384), causal=True, backend="reference")[:, :, q0:q1]
    assert _err(got, ref) < 2e-2


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("backend", ["auto", "efficient", "flex", "chunked"])
def test_masked_calls_on_cuda(backend, kind):
    q, k, v = _qkv(2, 4, 4, 100, 130, 64, seed=3)
    g = torch.Generator("cuda").manual_seed(4)
    allowed = torch.rand(2, 1, 100, 130, generator=g, device="cuda") > 0.3
    allowed[0, 0, 5] = False  # one empty row
    mask = allowed if kind == "bool" else torch.zeros(allowed.shape, device="cuda", dtype=torch.bfloat16).masked_fill(~allowed, float("-inf"))
    spec = attention_spec(q, k, v, mask=mask, causal=True)
    if backend != "auto" and (reason := BACKENDS[backend].support(spec)) is not None:
        pytest.skip(reason)
    got = attention(q, k, v, mask=mask, causal=True, backend=backend)
    ref = attention(q.double(), k.double(), v.double(), mask=allowed, causal=True, backend="reference")
    assert _err(got, ref) < 2e-2
    assert torch.equal(got[0, :, 5], torch.zeros_like(got[0, :, 5]))


@pytest.mark.parametrize("backend", ["auto", "math", "chunked", "flex", *FUSED])
def test_nan_in_q_gives_nan_on_cuda(backend):
    q, k, v = _qkv(1, 4, 4, 64, 64, 64, seed=5)
    q[0, 1, 7, 3] = float("nan")
    if backend != "auto" and (reason := BACKENDS[backend].support(attention_spec(q, k, v))) is not None:
        pytest.skip(reason)
    out = attention(q, k, v, backend=backend)
    assert torch.isnan(out[0, 1, 7]).all(), f"{backend}: a NaN query gave {out[0, 1, 7, :4]}"
    assert not torch.isnan(out[0, 1, 8]).any()


@pytest.mark.parametrize("backend", ["auto", *FUSED])
def test_empty_batch_on_cuda(backend):
    q, k, v = (t[:0].requires_grad_() for t in _qkv(1, 4, 4, 64, 64, 64))
    out = attention(q, k, v, causal=True, backend=backend)
    assert out.shape == (0, 4, 64, 64)
    out.sum().backward()
