"""The float64 reference itself, against an independent implementation (PyTorch SDPA math)."""

import pytest
import torch
import torch.nn.functional as F

from attnkit.ops import attention, causal_mask


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "causal"])
def test_reference_matches_torch_sdpa(mask_kind):
    q, k = torch.randn(2, 4, 13, 24, dtype=torch.float64), torch.randn(2, 2, 13, 24, dtype=torch.float64)
    v = torch.randn(2, 2, 13, 8, dtype=torch.float64)
    # The diagonal keeps every bool row non-empty (SDPA gives NaN for empty rows, attnkit zeros).
    masks = {"bool": (torch.rand(13, 13) > 0.3).fill_diagonal_(True), "additive": torch.randn(2, 1, 13, 13, dtype=torch.float64)}
    mask = masks.get(mask_kind)
    ours = attention(q, k, v, mask=mask, causal=mask_kind == "causal", backend="reference")
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask_kind == "causal", enable_gqa=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_causal_is_bottom_right_and_empty_rows_are_zero():
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    out, lse = attention(q, k, v, causal=True, return_lse=True, backend="reference")
    assert torch.equal(out[0, 0, :2], torch.zeros(2, 8)) and torch.isinf(lse[0, 0, :2]).all()
    assert torch.isfinite(lse[0, 0, 2:]).all() and lse.dtype == torch.float32


def test_dropout_mask_is_applied_and_scaled():
    q, k, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    keep = torch.rand(1, 1, 3, 5) > 0.5
    probs = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1)
    expected = (probs * keep / 0.5) @ v
    torch.testing.assert_close(attention(q, k, v, dropout_p=0.5, dropout_mask=keep, backend="math"), expected)
