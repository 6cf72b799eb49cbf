"""The patchify-convolution rewrite: which convolutions it takes, exactness, state dicts, the config flag."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnkit.optimize import OptimizeConfig, optimize
from attnkit.optimize.patchify import PatchifyGEMM, is_patchify


@pytest.mark.parametrize(
    "conv, taken",
    [
        (nn.Conv2d(3, 24, 16, stride=16), True),
        (nn.Conv2d(5, 7, (4, 3), stride=(4, 3), bias=False, padding="valid"), True),
        (nn.Conv2d(3, 24, 16, stride=8), False),  # overlapping patches
        (nn.Conv2d(3, 24, 4, stride=4, padding=1), False),
        (nn.Conv2d(3, 24, 4, stride=4, dilation=2), False),
        (nn.Conv2d(4, 24, 4, stride=4, groups=2), False),
        (nn.Conv1d(3, 24, 4, stride=4), False),
    ],
)
def test_recognised_generically(conv, taken):
    assert is_patchify(conv) is taken


@pytest.mark.parametrize("shape", [(2, 3, 32, 48), (2, 3, 35, 37), (3, 37, 33)])  # awkward sizes drop partial patches
@pytest.mark.parametrize("kernel", [16, (4, 5)])
def test_matches_the_convolution(shape, kernel):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 24, kernel, stride=kernel).double()
    gemm = PatchifyGEMM.from_conv(conv)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    ref, out = conv(x), gemm(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)  # the same sums in float64
    grads = torch.autograd.grad(out.square().sum(), (x, conv.weight, conv.bias))
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, conv.weight, conv.bias))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert out.flatten(2).transpose(1, 2).is_contiguous() or out.dim() == 3  # the ViT flatten + transpose is free


class TinyViT(nn.Module):
    """torchvision's ViT stem: conv_proj, flatten, class token, then nn.MultiheadAttention blocks."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, 8, stride=8)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim))
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)

    def forward(self, x):
        x = self.conv_proj(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.attn(x, x, x, need_weights=False)[0]


def test_rewrite_in_optimize():
    torch.manual_seed(0)
    model = TinyViT().eval()
    x = torch.randn(2, 3, 32, 32)
    optimized, report = optimize(model, (x,), config=OptimizeConfig(measure=False))
    assert type(optimized.conv_proj) is PatchifyGEMM and type(model.conv_proj) is nn.Conv2d
    rewrite = next(r for r in report.rewrites if r.path == "conv_proj")
    assert (rewrite.before, rewrite.after, rewrite.family) == ("Conv2d", "PatchifyGEMM", "conv")
    assert report.passed and report.checks
    assert optimized.state_dict().keys() == model.state_dict().keys()
    optimized.load_state_dict(model.state_dict())

    kept, report = optimize(model, (x,), config=OptimizeConfig(measure=False, check=False, patchify_gemm=False))
    assert type(kept.conv_proj) is nn.Conv2d
    assert ("conv_proj", "patchify_gemm=False") in {(s.path, s.reason) for s in report.skipped}
