"""dense_pieces_attention (equal documents as one batched dense call) against the float64 reference
with the pattern's dense mask: out, lse and gradients (through out and lse) for causal and non-causal
documents, one-token documents, GQA and a scale; refusals (sliding windows among them: they run on
FlexAttention); routing from sparse_attention, attention(backend="sparse") and MultiHeadAttention;
on a GPU, bf16 error against dense cuDNN's."""

from __future__ import annotations

import pytest
import torch

import attnkit.sparse.attention as sparse_module
from attnkit.errors import UnsupportedError
from attnkit.nn import MultiHeadAttention
from attnkit.ops import attention
from attnkit.sparse import Causal, Documents, SlidingWindow, sparse_attention
from attnkit.sparse.dense_pieces import dense_pieces_attention, dense_pieces_support

# float64 in, float64 out: the pieces and the reference differ only by summation order (the
# issue's bar); gradients chain two more matmuls on top of the softmax, so they get 10x.
TOL_FP64 = 1e-10


def _inputs(batch, heads, heads_kv, seq, dim, dtype=torch.float64, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(batch, h, seq, dim, generator=generator, dtype=dtype).to(device).requires_grad_()  # noqa: E731
    return make(heads), make(heads_kv), make(heads_kv)


def _reference(q, k, v, pattern, scale=None):
    """Plain masked softmax in q's dtype: ``(out, lse)``, GQA by repeating k and v."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~pattern.to_dense(q.shape[2], device=q.device), float("-inf"))
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


def _check(pattern, q, k, v, scale=None):
    out, lse = dense_pieces_attention(q, k, v, pattern, scale=scale, return_lse=True)
    ref, ref_lse = _reference(q, k, v, pattern, scale)
    torch.testing.assert_close(out, ref, atol=TOL_FP64, rtol=TOL_FP64)
    torch.testing.assert_close(lse, ref_lse, atol=TOL_FP64, rtol=TOL_FP64)  # every row sees itself: all finite
    generator = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=generator, dtype=out.dtype)
    grad_lse = torch.randn(lse.shape, generator=generator, dtype=lse.dtype)
    grads = torch.autograd.grad((out, lse), (q, k, v), (grad_out, grad_lse))
    ref_grads = torch.autograd.grad((ref, ref_lse), (q, k, v), (grad_out, grad_lse))
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, atol=10 * TOL_FP64, rtol=10 * TOL_FP64, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("documents", [(32,) * 4, (1,) * 9, (77,)], ids=["4x32", "9x1", "one"])
def test_equal_documents_match_reference(documents, causal):
    _check(Documents(documents, causal=causal), *_inputs(2, 4, 2, sum(documents), 8))


def test_documents_gqa_group_3_and_scale():
    _check(Documents((30,) * 3), *_inputs(1, 6, 2, 90, 8), scale=0.3)


def test_gradients_through_out_only():
    # lse unused: its gradient arrives as None (no materialized zeros).
    q, k, v = _inputs(1, 2, 2, 50, 8)
    pattern = Documents((25, 25), causal=False)
    out = dense_pieces_attention(q, k, v, pattern)
    ref, _ = _reference(q, k, v, pattern)
    grad_out = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(ref, (q, k, v), grad_out)):
        torch.testing.assert_close(got, want, atol=10 * TOL_FP64, rtol=10 * TOL_FP64)


@pytest.mark.parametrize(
    "pattern, match",
    [
        (Documents((30, 34)), "one length"),
        (Documents((32, 16)), "sum to 48"),
        (SlidingWindow(8), "sliding windows run on FlexAttention"),
        (SlidingWindow(8, causal=False), "sliding windows run on FlexAttention"),
        (SlidingWindow(64), "sliding windows run on FlexAttention"),  # W = S: causal, still refused
        (Documents((32, 32)) | Causal(), "got"),
        (Causal(), "got"),
    ],
    ids=repr,
)
def test_refuses_what_it_cannot_run(pattern, match):
    q, k, v = _inputs(1, 2, 2, 64, 8)
    assert dense_pieces_support(pattern, q, k) is not None
    with pytest.raises(UnsupportedError, match=match) as error:
        dense_pieces_attention(q, k, v, pattern)
    assert "sparse_attention(q, k, v, pattern)" in str(error.value)


def test_refuses_unequal_query_and_key_lengths():
    q, k, v = _inputs(1, 2, 2, 64, 8)
    with pytest.raises(UnsupportedError, match="Sq == Skv"):
        dense_pieces_attention(q[:, :, :32], k, v, Documents((32, 32)))


def test_sparse_attention_routes_on_cuda_half_only(monkeypatch):
    # The routing decision itself (CPU tensors never take the pieces; the CUDA tests run them).
    q, k, _ = _inputs(1, 2, 2, 4096, 8)
    assert not sparse_module._dense_pieces_run(q, k, Documents((2048, 2048)), None)
    monkeypatch.setattr(sparse_module, "_PIECES_MIN_DOCUMENT", 1)
    assert not sparse_module._dense_pieces_run(q, k, Documents((2048, 2048)), None)  # float64 on CPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_routes_equal_documents_not_windows(dtype):
    q, k, _ = _inputs(1, 4, 4, 4096, 64, dtype=dtype, device="cuda")
    assert sparse_module._dense_pieces_run(q, k, Documents((1024,) * 4), None)
    assert sparse_module._dense_pieces_run(q, k, Documents((2048, 2048), causal=False), None)
    assert not sparse_module._dense_pieces_run(q, k, Documents((64,) * 64), None)  # below _PIECES_MIN_DOCUMENT
    assert not sparse_module._dense_pieces_run(q, k, Documents((1000, 3096)), None)  # unequal
    for window in (SlidingWindow(1024), SlidingWindow(4096), SlidingWindow(1024, causal=False)):
        assert not sparse_module._dense_pieces_run(q, k, window, None)
    keep = torch.ones(1, 4096, dtype=torch.bool, device="cuda")
    assert not sparse_module._dense_pieces_run(q, k, Documents((1024,) * 4), keep)  # a key_mask: FlexAttention


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", [Documents((512,) * 8), Documents((1024,) * 4, causal=False)], ids=repr)
@pytest.mark.parametrize("heads_kv", [8, 2])
def test_gpu_bf16_error_within_flex_on_the_same_mask(pattern, heads_kv):
    # bf16 error vs float64 no worse than 1.5x FlexAttention's on the same pattern and data (the path
    # these documents took before): one dense call over more, shorter heads rounds its output once.
    # (Not against dense causal attention: shorter rows give larger gradients, so larger absolute errors.)
    seq = 4096
    q, k, v = _inputs(1, 8, heads_kv, seq, 128, dtype=torch.float32, device="cuda")
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    qh, kh, vh = (x.detach().bfloat16().requires_grad_() for x in (q, k, v))
    assert sparse_module._dense_pieces_run(qh, kh, pattern, None)
    out, lse = sparse_attention(qh, kh, vh, pattern, return_lse=True)
    flex, flex_lse = sparse_attention(qh, kh, vh, pattern.block_mask(seq, seq, device="cuda"), return_lse=True)  # a BlockMask: Flex
    ref, ref_lse = _reference(q64, k64, v64, pattern)
    grad_out = torch.randn_like(ref)
    got = torch.autograd.grad(out, (qh, kh, vh), grad_out.bfloat16())
    flex_got = torch.autograd.grad(flex, (qh, kh, vh), grad_out.bfloat16())
    want = torch.autograd.grad(ref, (q64, k64, v64), grad_out)
    # relative RMS: the max of |error| compares two kernels' single worst elements (an H200 run put
    # dense dq at 1.55x Flex's by that measure on the non-causal case, noise of one element)
    error = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
    assert error(out, ref) <= 1.5 * error(flex, ref)
    assert error(lse, ref_lse) <= 1.5 * error(flex_lse, ref_lse)
    for name, a, fa, b in zip("qkv", got, flex_got, want):
        assert error(a, b) <= 1.5 * error(fa, b), f"d{name}: {error(a, b):.3g} vs FlexAttention {error(fa, b):.3g}"


def test_ops_route_reads_the_pattern_behind_the_block_mask(monkeypatch):
    # attention(mask=pattern, backend="sparse") resolves the pattern to a BlockMask for Flex and keeps
    # the pattern in AttentionOptions.pattern, so the backend can run the dense pieces instead.
    q, k, v = _inputs(1, 2, 2, 64, 8)
    monkeypatch.setattr(sparse_module, "_dense_pieces_run", lambda q, k, pattern, key_mask: True)
    called = []
    real = sparse_module.dense_pieces_attention
    monkeypatch.setattr(sparse_module, "dense_pieces_attention", lambda *a, **kw: called.append(a[3]) or real(*a, **kw))
    pattern = Documents((32, 32))
    out, lse = attention(q, k, v, mask=pattern, backend="sparse", return_lse=True)
    assert called == [pattern]
    ref, ref_lse = _reference(q, k, v, pattern)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=0)


def test_multihead_attention_keeps_window_and_documents_causal(monkeypatch):
    # is_causal=True turns SlidingWindow(causal=False) / Documents(causal=False) into their causal
    # forms (same mask, one pattern; equal documents then take the pieces) instead of an Intersection.
    seen = []
    real = sparse_module.sparse_attention

    def spy(q, k, v, pattern, **kwargs):
        seen.append(pattern)
        return real(q, k, v, pattern, **kwargs)

    monkeypatch.setattr("attnkit.nn.sparse.sparse_attention", spy)
    torch.manual_seed(0)
    x = torch.randn(2, 64, 32, dtype=torch.float64)
    for sparsity, causal_form in ((SlidingWindow(16, causal=False), SlidingWindow(16)), (Documents((32, 32), causal=False), Documents((32, 32)))):
        layer = MultiHeadAttention(32, 4, batch_first=True, sparsity=sparsity, dtype=torch.float64)
        dense_layer = MultiHeadAttention(32, 4, batch_first=True, dtype=torch.float64)
        dense_layer.load_state_dict(layer.state_dict())
        out, _ = layer(x, x, x, need_weights=False, is_causal=True, attn_mask=None)
        assert seen[-1] == causal_form
        mask = ~causal_form.to_dense(64)  # torch's convention: True = may not attend
        want, _ = dense_layer(x, x, x, need_weights=False, attn_mask=mask)
        torch.testing.assert_close(out, want, atol=TOL_FP64, rtol=TOL_FP64)
