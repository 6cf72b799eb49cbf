"""Every backend that runs here against the float64 reference, on fresh random inputs.

Tolerance rule: relative error ``max|x - ref| / max|ref|`` <= 1e-5 in float32 for outputs,
lse and gradients (the float64 reference is exact to ~1e-15; float32 rounding of the
explicit formula itself is ~1e-7), 1e-12 in float64.
"""

import pytest
import torch

from attnkit.ops import BACKENDS, attention, attention_spec

# Eager FlexAttention on CPU is deliberate here (compiling would dominate the test time).
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}

# (B, Hq, Hkv, Sq, Skv, D, Dv, options): odd lengths, Sq != Skv both ways, head dims 16..256
# (59 is awkward), GQA 2 and 4, MQA, bool/additive masks, causal with Sq != Skv, dropout.
CASES = {
    "decode-causal": (1, 2, 2, 1, 17, 16, 16, {"causal": True}),
    "d59-bool": (2, 2, 2, 17, 17, 59, 59, {"mask": "bool"}),
    "sq>skv-causal": (1, 2, 1, 97, 33, 32, 32, {"causal": True}),
    "gqa2-additive": (2, 4, 2, 33, 97, 64, 64, {"mask": "additive"}),
    "mqa-causal-bool": (1, 4, 1, 17, 40, 128, 128, {"causal": True, "mask": "bool"}),
    "d256": (1, 2, 2, 5, 9, 256, 256, {}),
    "gqa4-dropout": (1, 4, 1, 17, 23, 16, 16, {"dropout_p": 0.3, "causal": True}),
    "dv!=d-additive-causal": (2, 2, 2, 17, 29, 24, 40, {"mask": "additive", "causal": True}),
}


def _inputs(case, dtype):
    batch, heads_q, heads_kv, seq_q, seq_kv, dim, dim_v, options = case
    q = torch.randn(batch, heads_q, seq_q, dim, dtype=dtype)
    k = torch.randn(batch, heads_kv, seq_kv, dim, dtype=dtype)
    v = torch.randn(batch, heads_kv, seq_kv, dim_v, dtype=dtype)
    kwargs = {key: value for key, value in options.items() if key != "mask"}
    if options.get("mask") == "bool":
        mask = torch.rand(batch, 1, seq_q, seq_kv) > 0.3
        mask[..., seq_q // 2, :] = False  # one row with no allowed key
        kwargs["mask"] = mask
    elif options.get("mask") == "additive":
        kwargs["mask"] = torch.randn(heads_q, 1, seq_kv, dtype=dtype)
    if "dropout_p" in options:
        kwargs["dropout_mask"] = torch.rand(batch, heads_q, seq_q, seq_kv) > options["dropout_p"]
    return (q, k, v), kwargs


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(x)), "infinities differ"
    return ((x - ref)[finite].abs().max() / ref[finite].abs().max().clamp_min(1e-30)).item()


def _run(tensors, kwargs, backend, *, grad, lse):
    tensors = [t.detach().requires_grad_(grad) for t in tensors]
    out = attention(*tensors, **kwargs, return_lse=lse, backend=backend)
    out, lse = out if lse else (out, None)
    if grad:
        # A weighted sum so that every output element gets its own gradient.
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype)).sum().backward()
    return [out.detach(), lse, *(t.grad for t in tensors)]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_backend_matches_reference(case, backend, dtype):
    tensors, kwargs = _inputs(CASES[case], dtype)
    support = BACKENDS[backend].support
    if (reason := support(attention_spec(*tensors, **kwargs))) is not None:
        pytest.skip(f"{backend}: {reason}")
    grad = support(attention_spec(*(t.detach().requires_grad_() for t in tensors), **kwargs)) is None
    lse = support(attention_spec(*tensors, **kwargs, return_lse=True)) is None
    expected = _run(tensors, kwargs, "reference", grad=grad, lse=lse)
    got = _run(tensors, kwargs, backend, grad=grad, lse=lse)
    for name, x, ref in zip(["out", "lse", "dq", "dk", "dv"], got, expected):
        if ref is not None:
            assert x.dtype == ref.dtype and x.shape == ref.shape, name
            assert relative_error(x, ref) <= TOLERANCE[dtype], f"{name}: {relative_error(x, ref):.2e}"


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "reference"])
def test_additive_mask_gradient(backend):
    """A learned additive bias (e.g. T5's position bias) gets the reference's gradient, or the backend says it cannot."""
    q, k, v = torch.randn(2, 4, 17, 16), torch.randn(2, 2, 23, 16), torch.randn(2, 2, 23, 16)
    bias = torch.randn(4, 17, 23, requires_grad=True)
    if (reason := BACKENDS[backend].support(attention_spec(q, k, v, mask=bias, causal=True))) is not None:
        pytest.skip(f"{backend}: {reason}")
    grads = [
        torch.autograd.grad(attention(q, k, v, mask=bias, causal=True, backend=name).square().sum(), bias)[0]
        for name in (backend, "reference")
    ]
    assert relative_error(*grads) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", ["math", "chunked"])
def test_lse_gradient(backend):
    """Ring attention merges partial results through lse, so lse must backpropagate too."""
    q, k, v = (torch.randn(1, 2, 37, 16, requires_grad=True) for _ in range(3))
    weights = torch.randn(1, 2, 37)
    grads = []
    for name in (backend, "reference"):
        out, lse = attention(q, k, v, causal=True, return_lse=True, backend=name)
        grads.append(torch.autograd.grad((lse * weights).sum() + out.sum(), (q, k, v)))
    for got, expected in zip(*grads):
        assert relative_error(got, expected) <= TOLERANCE[torch.float32]
