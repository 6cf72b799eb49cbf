"""ops.kernels: a block's forward with lse and its backward from the rows' final (out, lse), on CPU.

The plain path is exact up to float32 rounding: compared with a float64 autograd reference at
1e-5 (float32 inputs); float64 inputs give out, lse and the gradients to 1e-10 (lse comes back in
float64 for float64 inputs). ``accumulate=True`` returns out and the gradients unrounded (float32
for bf16 inputs), and a ``mask`` equals the same mask in the reference.
"""

import pytest
import torch

from attnkit.errors import InvalidArgumentError
from attnkit.ops.kernels import backward_from_lse, forward_with_lse
from attnkit.ops.lse import merge_partials


def _reference(q, k, v, causal, scale, mask=None):
    """float64 autograd reference: (out, lse), bottom-right causal, GQA by repetition, empty rows -> 0, -inf."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        seq_q, seq_kv = q.shape[2], k.shape[2]
        allowed = torch.arange(seq_kv) <= torch.arange(seq_q).unsqueeze(-1) + (seq_kv - seq_q)
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    empty = torch.isneginf(lse).unsqueeze(-1)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return probs @ v, lse


def _inputs(b, hq, hkv, sq, skv, d, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype) for shape in ((b, hq, sq, d), (b, hkv, skv, d), (b, hkv, skv, dv))]


# (B, Hq, Hkv, Sq, Skv, D, Dv, causal): GQA, Sq != Skv both ways, Sq > Skv causal (empty rows), D != Dv.
CASES = {
    "mha": (2, 3, 3, 17, 17, 16, 16, False),
    "gqa-causal": (1, 6, 2, 13, 13, 8, 8, True),
    "kv-longer-causal": (2, 4, 2, 5, 23, 16, 12, True),
    "q-longer-causal-empty-rows": (1, 2, 1, 19, 7, 8, 8, True),
    "cross": (2, 2, 1, 9, 31, 16, 8, False),
}


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward_match_fp64_autograd(case, dtype, tol):
    b, hq, hkv, sq, skv, d, dv, causal = CASES[case]
    q, k, v = _inputs(b, hq, hkv, sq, skv, d, dv, dtype)
    scale = 0.3
    out, lse = forward_with_lse(q, k, v, causal=causal, scale=scale)
    assert out.dtype == dtype and lse.dtype == torch.promote_types(dtype, torch.float32) and lse.shape == (b, hq, sq)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = _reference(q64, k64, v64, causal, scale)
    torch.testing.assert_close(out.double(), ref.detach(), atol=tol, rtol=tol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite].detach(), atol=tol, rtol=tol)

    g = torch.Generator().manual_seed(1)
    grad_out, grad_lse = torch.randn(out.shape, generator=g, dtype=dtype), torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    loss = (ref * grad_out.double()).sum() + (ref_lse.masked_fill(~finite, 0.0) * grad_lse.double()).sum()
    ref_grads = torch.autograd.grad(loss, (q64, k64, v64))
    grads = backward_from_lse(grad_out, q, k, v, out, lse, causal=causal, scale=scale, grad_lse=grad_lse)
    for name, got, want, like in zip("qkv", grads, ref_grads, (q, k, v)):
        assert got.dtype == dtype and got.shape == like.shape, name
        grad_tol = 10 * tol
        torch.testing.assert_close(got.double(), want, atol=grad_tol, rtol=grad_tol, msg=f"d{name}")
    if sq > skv and causal:  # the first Sq - Skv rows see no key: zero output, -inf lse, zero dq
        empty = slice(0, sq - skv)
        assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
        assert torch.isneginf(lse[:, :, empty]).all()
        assert torch.equal(grads[0][:, :, empty], torch.zeros_like(grads[0][:, :, empty]))


@pytest.mark.parametrize("causal", [False, True])
def test_block_grads_from_global_lse_sum_to_whole_attention(causal):
    """Ring attention's backward: per key block, given the rows' final (out, lse), gradients add up."""
    q, k, v = _inputs(2, 4, 2, 24, 24, 16, 16, torch.float32, seed=3)
    scale = 0.25
    bounds = [(0, 7), (7, 16), (16, 24)]
    # Forward by blocks, merged as ring attention does. Causal: query shard = the last block's rows,
    # seeing every earlier key block fully and its own block causally (bottom-right = diagonal).
    rows = slice(16, 24) if causal else slice(0, 24)
    q_shard = q[:, :, rows]
    parts = [
        forward_with_lse(q_shard, k[:, :, a:b], v[:, :, a:b], causal=causal and a == 16, scale=scale) for a, b in bounds
    ]
    out, lse = parts[0]
    for part in parts[1:]:
        out, lse = merge_partials(out, lse, *part)
    whole_out, whole_lse = forward_with_lse(q_shard, k, v, causal=causal, scale=scale)
    torch.testing.assert_close(out, whole_out.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, whole_lse, atol=1e-5, rtol=1e-5)

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q_shard, k, v))
    ref, _ = _reference(q64, k64, v64, causal, scale)
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    dq = torch.zeros_like(q_shard)
    for a, b in bounds:
        block_dq, dk, dv = backward_from_lse(
            grad_out, q_shard, k[:, :, a:b], v[:, :, a:b], out, lse, causal=causal and a == 16, scale=scale
        )
        dq += block_dq
        torch.testing.assert_close(dk.double(), ref_dk[:, :, a:b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dv.double(), ref_dv[:, :, a:b], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dq.double(), ref_dq, atol=1e-5, rtol=1e-5)


def test_planted_wrong_lse_is_caught():
    """The backward must use the given lse: a block-local lse (not the rows' final one) gives wrong dk."""
    q, k, v = _inputs(1, 2, 2, 8, 16, 8, 8, torch.float64, seed=5)
    out, lse = forward_with_lse(q, k, v, causal=False)
    _, local_lse = forward_with_lse(q, k[:, :, :8], v[:, :, :8], causal=False)
    grad_out = torch.randn_like(out)
    _, right, _ = backward_from_lse(grad_out, q, k[:, :, :8], v[:, :, :8], out, lse, causal=False)
    _, wrong, _ = backward_from_lse(grad_out, q, k[:, :, :8], v[:, :, :8], out, local_lse, causal=False)
    assert (right - wrong).abs().max() > 1e-3


def test_empty_batch_and_fully_hidden_block():
    q, k, v = _inputs(0, 2, 2, 4, 4, 8, 8, torch.float32)
    out, lse = forward_with_lse(q, k, v, causal=True)
    assert out.shape == (0, 2, 4, 8) and lse.shape == (0, 2, 4)
    q, k, v = _inputs(1, 2, 2, 4, 0, 8, 8, torch.float32)  # no keys at all
    out, lse = forward_with_lse(q, k, v, causal=False)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    grads = backward_from_lse(torch.ones_like(out), q, k, v, out, lse, causal=False)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_bad_inputs_name_the_parameter():
    q, k, v = _inputs(1, 3, 2, 4, 4, 8, 8, torch.float32)
    with pytest.raises(InvalidArgumentError, match="k, v shapes"):
        forward_with_lse(q, k, v, causal=False)
    q, k, v = _inputs(1, 2, 2, 4, 4, 8, 8, torch.float32)
    with pytest.raises(InvalidArgumentError, match="kernel"):
        forward_with_lse(q, k, v, causal=False, kernel="bogus")


@pytest.mark.parametrize("causal", [False, True])
def test_mask_and_accumulate_match_fp64_autograd(causal):
    """A bool mask (B, 1, Sq, Skv) on top of causal, rows it empties included; bf16 with ``accumulate``
    comes back in float32 and closer to float64 than the bf16-rounded result."""
    b, hq, hkv, sq, skv, d = 2, 4, 2, 11, 11, 16
    q, k, v = _inputs(b, hq, hkv, sq, skv, d, d, torch.float64, seed=5)
    mask = torch.rand(b, 1, sq, skv, generator=torch.Generator().manual_seed(2)) > 0.5
    mask[0, 0, 3] = False  # a row with no key
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    ref, ref_lse = _reference(q64, k64, v64, causal, 0.3, mask)
    g = torch.Generator().manual_seed(1)
    grad_out, grad_lse = torch.randn(ref.shape, generator=g, dtype=torch.float64), torch.randn(ref_lse.shape, generator=g, dtype=torch.float64)
    finite = torch.isfinite(ref_lse)
    loss = (ref * grad_out).sum() + (ref_lse.masked_fill(~finite, 0.0) * grad_lse).sum()
    ref_grads = torch.autograd.grad(loss, (q64, k64, v64))

    out, lse = forward_with_lse(q, k, v, causal=causal, scale=0.3, mask=mask)
    torch.testing.assert_close(out, ref.detach(), atol=1e-12, rtol=1e-12)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], ref_lse[finite].detach(), atol=1e-12, rtol=1e-12)
    grads = backward_from_lse(grad_out, q, k, v, out, lse, causal=causal, scale=0.3, grad_lse=grad_lse, mask=mask)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-11)

    def error(x, ref):
        return ((x.double() - ref).norm() / ref.norm()).item()

    bf = [t.bfloat16() for t in (q, k, v)]
    grads = {}
    for accumulate in (False, True):
        out, lse = forward_with_lse(*bf, causal=causal, scale=0.3, mask=mask, accumulate=accumulate)
        grads[accumulate] = backward_from_lse(grad_out.bfloat16(), *bf, out, lse, causal=causal, scale=0.3, mask=mask, grad_lse=grad_lse.float(), accumulate=accumulate)
        assert out.dtype == grads[accumulate][1].dtype == (torch.float32 if accumulate else torch.bfloat16)
    # The same gradient (up to bf16 rounding of out and dk), not yet rounded to bf16.
    unrounded = grads[True][1]
    assert error(unrounded, grads[False][1].double()) < 1e-2 and not torch.equal(unrounded.bfloat16().float(), unrounded)
