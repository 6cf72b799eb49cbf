"""Shared pieces of the FP8 tests: an fp64 reference linear step and the SQNR of a layer against it."""

from __future__ import annotations

import torch
from torch import nn

from attnkit.fp8 import Float8Linear, Float8TrainingConfig, sqnr


def reference_and_fp8(config: Float8TrainingConfig, m: int, k: int, n: int, *, device: str = "cpu",
                      seed: int = 0, x: torch.Tensor | None = None) -> dict[str, float]:
    """Run one fwd+bwd of an fp64 ``nn.Linear`` and of ``Float8Linear`` (bf16 activations) on the same data.

    Returns SQNR in dB of the FP8 layer's output, input gradient, weight gradient and bias gradient.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen, dtype=torch.float64) if x is None else x.double()
    grad = torch.randn(m, n, generator=gen, dtype=torch.float64)
    ref = nn.Linear(k, n, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(n, k, generator=gen, dtype=torch.float64) / k**0.5)
    xr = x.clone().requires_grad_()
    out_ref = ref(xr)
    out_ref.backward(grad)

    layer = Float8Linear.from_float(nn.Linear(k, n, device=device), config)
    with torch.no_grad():
        layer.weight.copy_(ref.weight)
        layer.bias.copy_(ref.bias)
    xf = x.to(device, torch.bfloat16).requires_grad_()
    out = layer(xf)
    out.backward(grad.to(device, torch.bfloat16))
    return {
        "out": sqnr(out_ref, out.cpu()),
        "grad_input": sqnr(xr.grad, xf.grad.cpu()),
        "grad_weight": sqnr(ref.weight.grad, layer.weight.grad.cpu()),
        "grad_bias": sqnr(ref.bias.grad, layer.bias.grad.cpu()),
    }


def bf16_linear_sqnr(m: int, k: int, n: int, seed: int = 0) -> float:
    """SQNR of a plain bf16 matmul against fp64 on the same data: the ceiling FP8 is compared with."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    torch.randn(m, n, generator=gen, dtype=torch.float64)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) / k**0.5
    return sqnr(x @ w.t(), (x.bfloat16() @ w.bfloat16().t()))
