"""`PatchifyGEMM`: a patchify convolution (ViT's patch embedding) as a reshape and one GEMM.

A ``Conv2d`` whose stride equals its kernel size, without padding, dilation or groups, sees
every input pixel exactly once: output position ``(i, j)`` is the dot product of the weight with
the patch ``x[:, :, i*kh:(i+1)*kh, j*kw:(j+1)*kw]``. Cutting the image into those patches is a
reshape and a permute, so the whole convolution is ``F.linear(patches, weight.view(out, -1), bias)``
(the same sums, in another order). On a GPU that replaces the convolution kernel and the two
NCHW <-> NHWC layout transposes around it with one GEMM; the output is returned as a
``(B, out, H', W')`` view of the GEMM's ``(B, H'*W', out)`` result, so the ``flatten(2).transpose(1, 2)``
that ViTs apply next is free.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PatchifyGEMM", "is_patchify"]


def is_patchify(module: nn.Module) -> bool:
    """Whether ``module`` is exactly an ``nn.Conv2d`` with stride == kernel size, no padding, dilation 1, groups 1."""
    return (
        type(module) is nn.Conv2d
        and tuple(module.stride) == tuple(module.kernel_size)
        and module.padding in ((0, 0), "valid")
        and tuple(module.dilation) == (1, 1)
        and module.groups == 1
    )


class PatchifyGEMM(nn.Module):
    """A patchify ``nn.Conv2d`` computed as one GEMM over the reshaped image.

    Shares the convolution's ``weight (out, in, kh, kw)`` and ``bias (out,)`` parameters under
    the same names, so the state dict keeps the original's keys and shapes. Build with
    :meth:`from_conv`; accepts ``(B, in, H, W)`` or unbatched ``(in, H, W)`` like the convolution
    (rows and columns that do not fill a whole patch are dropped, as the convolution does).
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        assert is_patchify(conv), conv
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = self.stride = tuple(conv.kernel_size)
        self.weight = conv.weight
        self.bias = conv.bias

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "PatchifyGEMM":
        """Rewrite ``conv`` (its parameters are shared, never copied)."""
        module = cls(conv)
        module.train(conv.training)
        return module

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=stride={self.kernel_size}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        batch, channels, height, width = x.shape
        kh, kw = self.kernel_size
        rows, cols = height // kh, width // kw
        if (rows * kh, cols * kw) != (height, width):
            x = x[:, :, : rows * kh, : cols * kw]
        patches = x.reshape(batch, channels, rows, kh, cols, kw).permute(0, 2, 4, 1, 3, 5)  # (B, H', W', C, kh, kw)
        out = F.linear(patches.reshape(batch, rows * cols, -1), self.weight.reshape(self.out_channels, -1), self.bias)  # (B, H'*W', out)
        return out.transpose(1, 2).unflatten(2, (rows, cols))  # (B, out, H', W'), a view
