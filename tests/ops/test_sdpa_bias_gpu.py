"""The fused CUDA kernels with a mask: the merged mask as an additive ``attn_bias`` into the ATen ops.

Each masked case runs the kernel's ATen op directly (``ops/sdpa.py``, ``_cuda_biased``) and is compared,
forward and gradients, with the float64 reference. Tolerance rule as in test_ops_gpu.py: error against
float64 <= K x the error of the plain bf16 ``math`` backend + a floor (K = 2 for the output, 3 for
gradients). Both kernels run through ``attention()`` with the support check (cuDNN takes masks that need
no gradient). Under ``torch.compile`` a masked call goes through ``F.scaled_dot_product_attention``
(the mask stays compact there); ``test_compiled_masked_call_matches_float64`` covers that path.
"""

import pytest
import torch

from attnkit.errors import UnsupportedError
from attnkit.ops import BACKENDS, attention, attention_spec

pytestmark = [pytest.mark.gpu]

K_OUT, K_GRAD, FLOOR = 2.0, 3.0, 1e-4
_SDP_FLAGS = ("flash", "mem_efficient", "math", "cudnn")
# (B, Hq, Hkv, Sq, Skv, D): Skv not a multiple of 8 (the bias is padded for alignment), GQA, Sq > Skv.
SHAPES = {"odd-skv": (2, 4, 4, 100, 130, 64), "gqa": (2, 8, 2, 97, 257, 128), "sq>skv": (1, 4, 4, 300, 129, 64)}
MASKS = ["bool", "additive", "bool-empty-rows", "key-padding", "additive-grad"]


def _sdp_flags() -> tuple[bool, ...]:
    return tuple(getattr(torch._C, f"_get_{name}_sdp_enabled")() for name in _SDP_FLAGS)


def _err(x, ref) -> float:
    finite = torch.isfinite(ref)
    return (x.double() - ref)[finite].abs().max().item()


def _inputs(shape, kind, seed=0):
    b, hq, hkv, sq, skv, d = shape
    g = torch.Generator("cuda").manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16) for s in ((b, hq, sq, d), (b, hkv, skv, d), (b, hkv, skv, d)))
    if kind == "key-padding":
        allowed = (torch.arange(skv, device="cuda") < torch.tensor([skv - 17, skv], device="cuda")[:b, None])[:, None, None, :]  # (B, 1, 1, Skv)
    else:
        allowed = torch.rand(b, 1, sq, skv, generator=g, device="cuda") > 0.3
    if kind == "bool-empty-rows":
        allowed[0, 0, 5] = False
        allowed[-1, 0, -1] = False
    if kind.startswith("additive"):
        bias = 0.5 * torch.randn(allowed.shape, generator=g, device="cuda")
        mask = bias.masked_fill(~allowed, float("-inf")).to(torch.bfloat16)
        ref_mask = mask.double()
    else:
        mask = ref_mask = allowed
    return q, k, v, mask, ref_mask


def _results(run, q, k, v, mask, grad_mask=False, **options):
    """``[out, dq, dk, dv(, dmask)]`` for one upstream gradient, the same (drawn in bf16) for every dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if grad_mask:
        mask = mask.detach().clone().requires_grad_()
        leaves.append(mask)
    out = run(*leaves[:3], mask, **options)
    grad_out = torch.randn(out.shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda", dtype=torch.bfloat16)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(out.dtype))]


def _by(backend, *, check_support):
    if check_support:
        return lambda q, k, v, mask, **options: attention(q, k, v, mask=mask, backend=backend, **options)
    return lambda q, k, v, mask, **options: BACKENDS[backend].run(q, k, v, mask=mask, **options)[0]


def _compare(got, math, ref, names):
    for name, x, base, r, kf in zip(names, got, math, ref, [K_OUT] + [K_GRAD] * (len(names) - 1)):
        limit = kf * _err(base, r) + FLOOR
        assert _err(x, r) <= limit, f"{name}: {_err(x, r):.2e} > {limit:.2e}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel", ["efficient", "cudnn"])
def test_masked_kernel_matches_float64(kernel, shape, kind, causal, monkeypatch):
    q, k, v, mask, ref_mask = _inputs(SHAPES[shape], kind)
    grad_mask = kind == "additive-grad"
    if kernel == "cudnn" and grad_mask:
        pytest.skip("cuDNN's ATen op does not backpropagate into attn_bias (its support rule refuses such masks)")
    # the public path: the support rules admit every case here
    assert BACKENDS[kernel].support(attention_spec(q, k, v, mask=mask, causal=causal)) is None
    flips = []
    for name in ("flash", "mem_efficient", "math", "cudnn"):
        monkeypatch.setattr(torch._C, f"_set_sdp_use_{name}", lambda enabled, name=name: flips.append((name, enabled)))
    before = _sdp_flags()
    ref = _results(_by("reference", check_support=True), q.double(), k.double(), v.double(), ref_mask, grad_mask, causal=causal)
    math = _results(_by("math", check_support=True), q, k, v, mask, grad_mask, causal=causal)
    got = _results(_by(kernel, check_support=True), q, k, v, mask, grad_mask, causal=causal)
    assert flips == [] and _sdp_flags() == before  # no process-wide SDPA flag was touched
    _compare(got, math, ref, ["out", "dq", "dk", "dv", "dmask"][: len(got)])
    if kind == "bool-empty-rows":  # attnkit's rule: a query with no allowed key gets zeros, and no gradient
        assert torch.equal(got[0][0, :, 5], torch.zeros_like(got[0][0, :, 5]))
        assert torch.equal(got[1][0, :, 5], torch.zeros_like(got[1][0, :, 5]))


@pytest.mark.parametrize("kernel", ["efficient", "cudnn"])
def test_causal_offsets_the_flags_cannot_express(kernel):
    """Causal at an offset the kernel has no flag for (cuDNN: top-left with Sq != Skv; efficient: a shard's
    offset) becomes a bias; rows that see no key come back as zeros."""
    q, k, v, _, _ = _inputs((1, 4, 2, 192, 256, 64), "bool", seed=2)
    cases = [(0, 0)] if kernel == "cudnn" else [(0, 0), (128, 0), (0, 64)]
    for q_start, kv_start in cases:
        spec = attention_spec(q, k, v, causal=True, q_start=q_start, kv_start=kv_start)
        assert BACKENDS[kernel].support(spec) is None, BACKENDS[kernel].support(spec)
        options = dict(causal=True, q_start=q_start, kv_start=kv_start)
        ref = _results(lambda *t, **o: attention(*t[:3], backend="reference", **o), q.double(), k.double(), v.double(), None, **options)
        math = _results(lambda *t, **o: attention(*t[:3], backend="math", **o), q, k, v, None, **options)
        got = _results(lambda *t, **o: attention(*t[:3], backend=kernel, **o), q, k, v, None, **options)
        _compare(got, math, ref, ["out", "dq", "dk", "dv"])


def test_flash_refuses_a_mask_by_rule_and_by_kernel():
    q, k, v, mask, _ = _inputs(SHAPES["odd-skv"], "bool")
    assert "no attention mask" in BACKENDS["flash"].support(attention_spec(q, k, v, mask=mask))
    with pytest.raises(UnsupportedError, match="flash"):
        attention(q, k, v, mask=mask, backend="flash")
    with pytest.raises(UnsupportedError, match="flash on CUDA takes no attention mask"):
        BACKENDS["flash"].run(q, k, v, mask=mask)


def test_masked_efficient_dropout_keeps_the_expectation():
    """Dropout on the biased path: the mean over draws of the output approaches the dropout-free one."""
    q, k, v, mask, _ = _inputs((1, 2, 2, 64, 72, 64), "bool-empty-rows", seed=3)
    exact = attention(q.float(), k.float(), v.float(), mask=mask, backend="efficient")
    draws = torch.stack([attention(q.float(), k.float(), v.float(), mask=mask, dropout_p=0.25, backend="efficient") for _ in range(400)])
    assert not torch.equal(draws[0], draws[1])
    assert (draws.mean(0) - exact).abs().mean() < 0.02
    assert torch.equal(draws[:, 0, :, 5], torch.zeros_like(draws[:, 0, :, 5]))  # empty rows stay zero


@pytest.mark.parametrize("kind", ["bool-empty-rows", "additive", "key-padding"])
@pytest.mark.parametrize("kernel", ["efficient", "cudnn"])
def test_compiled_masked_call_matches_float64(kernel, kind):
    torch._dynamo.reset()
    q, k, v, mask, ref_mask = _inputs(SHAPES["gqa"], kind)
    compiled = torch.compile(lambda q, k, v, mask: attention(q, k, v, mask=mask, backend=kernel), fullgraph=True)
    ref = _results(_by("reference", check_support=True), q.double(), k.double(), v.double(), ref_mask)
    math = _results(_by("math", check_support=True), q, k, v, mask)
    got = _results(lambda q, k, v, mask: compiled(q, k, v, mask), q, k, v, mask)
    _compare(got, math, ref, ["out", "dq", "dk", "dv"])
    if kind == "bool-empty-rows":
        assert torch.equal(got[0][0, :, 5], torch.zeros_like(got[0][0, :, 5]))
