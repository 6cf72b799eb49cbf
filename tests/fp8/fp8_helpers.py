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


EMULATED_FLOOR_DB = 45
"""SQNR floor of the real ``_scaled_mm`` path against the emulation on the same FP8 operands: only the fp32
accumulation order (and the emulation's matmul precision, TF32 at worst: ~60 dB) differ, below the ~55 dB
of the bf16 rounding of a result; a 1% wrong dequantisation scale gives 40 dB."""

MODES = ("eager", "emulate", "inductor", "aot_eager")
"""How :func:`fwd_bwd_per_mode` runs the layer: real ``_scaled_mm``, emulated, or real and compiled."""


def fwd_bwd_per_mode(name: str, modes: tuple[str, ...], *, device: str, shape: tuple[int, ...] = (4, 256, 512),
                     out_features: int = 384, dtype: torch.dtype = torch.bfloat16,
                     seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One fwd+bwd of the same ``Float8Linear`` (recipe ``name``, fp32 parameters) per mode of :data:`MODES`.

    Every mode gets the same x (``shape``, ``dtype``) and the same fixed upstream gradient, so the backward
    GEMMs quantise the same grad_output. A loss of the output (``out.square().sum()``) would not: the modes'
    outputs legitimately differ in a few ulps (accumulation order), and E5M2 (2 mantissa bits) turns a
    1-ulp change into another FP8 code, or, where the amax moves, moves every code of the tensor.

    Returns:
        ``{mode: (out, grad_x, grad_weight)}``.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device, dtype)
    grad = torch.randn(*shape[:-1], out_features, generator=gen).to(device, dtype)
    results = {}
    for mode in modes:
        torch.manual_seed(seed)
        config = Float8TrainingConfig.from_recipe_name(name, emulate=mode == "emulate", fast_accum_forward=False)
        layer = Float8Linear.from_float(nn.Linear(shape[-1], out_features, device=device), config)
        fn = layer if mode in ("eager", "emulate") else torch.compile(layer, fullgraph=True, backend=mode)
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.backward(grad)
        results[mode] = (out.detach(), xi.grad, layer.weight.grad)
    return results
