"""ops.kernels on CUDA: every fused kernel's forward (out, lse) and backward-from-lse against float64.

Tolerance rule (FlashAttention's): a kernel's error against the float64 reference may be at most
K times the error of a plain bf16 implementation (explicit softmax in bf16) plus a small floor,
K = 2 for out and lse, 3 for gradients.
"""

import pytest
import torch

from attnkit.ops.kernels import KERNELS, backward_from_lse, forward_with_lse, kernel_for
from attnkit.ops.lse import merge_partials

pytestmark = [pytest.mark.gpu]

K_OUT, K_GRAD, FLOOR = 2.0, 3.0, 1e-4

# (B, Hq, Hkv, Sq, Skv, D, causal): odd lengths, GQA, Sq < Skv and Sq > Skv (empty rows) causal.
SHAPES = {
    "hd64-cross": (2, 4, 4, 97, 300, 64, False),
    "hd128-causal-gqa": (1, 8, 2, 257, 257, 128, True),
    "hd64-causal-kv-longer": (1, 4, 2, 97, 513, 64, True),
    "hd64-causal-q-longer": (1, 4, 4, 300, 129, 64, True),
}


def _explicit(q, k, v, causal, scale, grad_lse=None):
    """(out, lse) by explicit softmax in q's dtype with autograd (the reference in float64)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        seq_q, seq_kv = q.shape[2], k.shape[2]
        allowed = torch.arange(seq_kv, device=q.device) <= torch.arange(seq_q, device=q.device).unsqueeze(-1) + (seq_kv - seq_q)
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores.float() if q.dtype != torch.float64 else scores, dim=-1)
    empty = torch.isneginf(lse).unsqueeze(-1)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return probs @ v, lse


def _all(q, k, v, causal, scale, grad_out, grad_lse, kernel=None, dtype=None):
    """out, lse, dq, dk, dv for a kernel (None: the explicit formula in ``dtype`` with autograd)."""
    if kernel is not None:
        out, lse = forward_with_lse(q, k, v, causal=causal, scale=scale, kernel=kernel)
        grads = backward_from_lse(grad_out, q, k, v, out, lse, causal=causal, scale=scale, grad_lse=grad_lse, kernel=kernel)
        return [out, lse, *grads]
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = _explicit(*leaves, causal, scale)
    finite = torch.isfinite(lse)
    loss = (out * grad_out.to(dtype)).sum() + (lse.masked_fill(~finite, 0.0) * grad_lse.to(lse.dtype)).sum()
    return [out.detach(), lse.detach(), *torch.autograd.grad(loss, leaves)]


def _error(x, ref):
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(x), finite), "empty rows (-inf lse) differ"
    return (x[finite].double() - ref[finite]).abs().max().item() if finite.any() else 0.0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel", [*KERNELS, "plain"])
@pytest.mark.parametrize("with_grad_lse", [False, True])
def test_kernel_matches_fp64(kernel, shape, with_grad_lse):
    b, hq, hkv, sq, skv, d, causal = SHAPES[shape]
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16) for s in ((b, hq, sq, d), (b, hkv, skv, d), (b, hkv, skv, d)))
    if kernel != "plain" and (reason := KERNELS[kernel].support(q, k, v, causal)) is not None:
        pytest.skip(reason)
    if kernel != "plain" and with_grad_lse and (reason := KERNELS[kernel].support(*(torch.nn.functional.pad(t, (0, 8)) for t in (q, k, v)), causal)):
        pytest.skip(f"d lse adds 8 head-dim columns: {reason}")
    scale = d**-0.5
    grad_out = torch.randn(b, hq, sq, d, generator=g, device="cuda", dtype=torch.bfloat16)
    grad_lse = torch.randn(b, hq, sq, generator=g, device="cuda") if with_grad_lse else None
    zero_lse = torch.zeros(b, hq, sq, device="cuda")
    ref = _all(q, k, v, causal, scale, grad_out, zero_lse if grad_lse is None else grad_lse, dtype=torch.float64)
    plain = _all(q, k, v, causal, scale, grad_out, zero_lse if grad_lse is None else grad_lse, dtype=torch.bfloat16)
    got = _all(q, k, v, causal, scale, grad_out, grad_lse, kernel=kernel)
    for name, x, r, p, like in zip(("out", "lse", "dq", "dk", "dv"), got, ref, plain, (q, zero_lse, q, k, v)):
        assert x.shape == like.shape and x.dtype == like.dtype, name
        bound = (K_OUT if name in ("out", "lse") else K_GRAD) * _error(p, r) + FLOOR
        assert _error(x, r) <= bound, f"{kernel} {name}: error {_error(x, r):.3g} > {bound:.3g}"


@pytest.mark.parametrize("kernel", [*KERNELS, "plain"])
def test_ring_blocks_sum_to_whole(kernel):
    """Causal ring step on one GPU: the last query shard against three key blocks, merged and differentiated."""
    g = torch.Generator("cuda").manual_seed(1)
    q, k, v = (torch.randn(1, 8, 384, 64, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k, v = k[:, :2].contiguous(), v[:, :2].contiguous()  # GQA 8:2
    bounds, rows = [(0, 128), (128, 256), (256, 384)], slice(256, 384)
    q_shard = q[:, :, rows]
    parts = [forward_with_lse(q_shard, k[:, :, a:e], v[:, :, a:e], causal=a == 256, kernel=kernel) for a, e in bounds]
    out, lse = parts[0]
    for part in parts[1:]:
        out, lse = merge_partials(out, lse, *part)
    grad_out = torch.randn(out.shape, generator=g, device="cuda", dtype=torch.bfloat16)
    dq, dks, dvs = 0, [], []
    for a, e in bounds:
        block = backward_from_lse(grad_out, q_shard, k[:, :, a:e], v[:, :, a:e], out, lse, causal=a == 256, kernel=kernel)
        dq, dks, dvs = dq + block[0].float(), dks + [block[1]], dvs + [block[2]]
    leaves = [t.double().requires_grad_() for t in (q_shard, k, v)]
    ref_out, _ = _explicit(*leaves, True, 64**-0.5)
    ref = torch.autograd.grad(ref_out, leaves, grad_out.double())
    assert _error(out, ref_out.detach()) < 2e-2
    for got, want in ((dq, ref[0]), (torch.cat(dks, 2), ref[1]), (torch.cat(dvs, 2), ref[2])):
        assert _error(got, want) < 5e-2 * want.abs().max().item()


def test_default_choice_and_timings():
    """Prints forward+backward ms per kernel at a ring-sized block; the default must be a fused kernel."""
    g = torch.Generator("cuda").manual_seed(2)
    q, k, v = (torch.randn(1, 16, 4096, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert kernel_for(q, k, v, causal=True) in KERNELS
    for causal in (False, True):
        line = []
        for name in KERNELS:
            if KERNELS[name].support(q, k, v, causal) is not None:
                continue

            def step():
                out, lse = forward_with_lse(q, k, v, causal=causal, kernel=name)
                return backward_from_lse(out, q, k, v, out, lse, causal=causal, kernel=name)

            for _ in range(3):
                step()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                step()
            end.record()
            end.synchronize()
            line.append(f"{name} {start.elapsed_time(end) / 10:.3f} ms")
        print(f"\nfwd+bwd B1 H16 S4096 D128 bf16 causal={causal}: " + ", ".join(line))
