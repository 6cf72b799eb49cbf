"""merge_partials: two partial attentions over disjoint key sets merge into the whole, in float32."""

import pytest
import torch

from attnkit.ops import attention
from attnkit.ops.lse import merge_partials


def _split_attention(q, k, v, mask, split, dtype):
    """Attention over keys [:split] and [split:] separately, merged."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    parts = []
    for keys in (slice(0, split), slice(split, None)):
        sub_mask = None if mask is None else mask[..., keys]
        parts.append(attention(q, k[..., keys, :], v[..., keys, :], mask=sub_mask, backend="chunked", return_lse=True))
    return merge_partials(*parts[0], *parts[1])


@pytest.mark.parametrize("split", [1, 17, 40])
def test_merge_equals_whole_in_fp64(split):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 19, 16), torch.randn(2, 3, 41, 16), torch.randn(2, 3, 41, 8)
    mask = torch.rand(2, 1, 19, 41) > 0.3
    out, lse = _split_attention(q, k, v, mask, split, torch.float64)
    ref, ref_lse = attention(q.double(), k.double(), v.double(), mask=mask, backend="reference", return_lse=True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64  # float64 partials merge in float64
    # chunked's lse is float32 by contract, so the merge weights carry float32 rounding.
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, ref_lse.double(), atol=1e-6, rtol=1e-6)


def test_rows_empty_in_one_or_both_halves():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 6, 8, dtype=torch.float64), torch.randn(1, 2, 10, 8, dtype=torch.float64), torch.randn(1, 2, 10, 8, dtype=torch.float64)
    mask = torch.ones(1, 1, 6, 10, dtype=torch.bool)
    mask[..., 0, :] = False          # row 0: empty everywhere
    mask[..., 1, :5] = False         # row 1: empty in the first half only
    mask[..., 2, 5:] = False         # row 2: empty in the second half only
    q.requires_grad_(True)
    out, lse = _split_attention(q, k, v, mask, 5, torch.float64)
    ref, ref_lse = attention(q.detach(), k, v, mask=mask, backend="reference", return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(out[..., 0, :], torch.zeros_like(out[..., 0, :]))
    assert torch.isneginf(lse[..., 0]).all() and torch.isfinite(lse[..., 1:]).all()
    (out.sum() + lse[..., 1:].sum()).backward()
    assert torch.isfinite(q.grad).all()


def test_merge_is_order_free_and_extreme_lse_does_not_overflow():
    out_a, out_b = torch.randn(4, 8), torch.randn(4, 8)
    lse_a = torch.tensor([1000.0, -1000.0, 0.0, float("-inf")])
    lse_b = torch.tensor([-1000.0, 1000.0, 0.0, 3.0])
    ab, lse_ab = merge_partials(out_a, lse_a, out_b, lse_b)
    ba, lse_ba = merge_partials(out_b, lse_b, out_a, lse_a)
    torch.testing.assert_close(ab, ba)
    torch.testing.assert_close(lse_ab, lse_ba)
    torch.testing.assert_close(ab[0], out_a[0]); torch.testing.assert_close(ab[1], out_b[1])
    torch.testing.assert_close(ab[2], (out_a[2] + out_b[2]) / 2)
    torch.testing.assert_close(ab[3], out_b[3])
    torch.testing.assert_close(lse_ab, torch.tensor([1000.0, 1000.0, torch.log(torch.tensor(2.0)).item(), 3.0]))
