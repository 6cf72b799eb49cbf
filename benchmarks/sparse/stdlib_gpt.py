"""The sparse benchmarks' model and data: a byte-level GPT with rotary positions on the Python
standard library's own sources (``quality.py`` trains one and evaluates sparse settings on it,
``train.py`` trains dense and sparse copies side by side).

``attend(q, k, v, layer) -> out`` is the one hook: every attention call of the model goes through it
(``(B, nh, T, hs)`` in and out), so a benchmark swaps in a sparse kernel or a probe without a second model.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared corpus
from stdlib_corpus import corpus  # noqa: E402  (re-exported: the sparse benchmarks import it from here)

__all__ = ["corpus", "GPT", "rotary", "sample_windows", "learning_rate"]


def sample_windows(data: torch.Tensor, batch: int, context: int, generator: torch.Generator) -> torch.Tensor:
    """``(batch, context + 1)`` random windows of ``data`` (inputs ``[:, :-1]``, targets ``[:, 1:]``); the
    generator alone fixes the order, so runs with one seed see the same batches."""
    starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=generator)
    return torch.stack([data[s : s + context + 1] for s in starts.tolist()])


def learning_rate(peak: float, step: int, progress: float, warmup: int = 30) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``peak`` to ``0.1 * peak`` as ``progress`` goes 0 -> 1."""
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, attend, rotate):
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs) each
        y = attend(rotate(q), rotate(k), v).transpose(1, 2).reshape(batch, length, dim)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


def rotary(length: int, head_dim: int, device=None):
    """Rotary position embedding of ``(B, nh, T, hs)`` tensors (relative positions: attention learns
    locality fast); the result keeps the input's dtype (bf16 under autocast)."""
    frequencies = 10000.0 ** (-torch.arange(0, head_dim, 2, device=device) / head_dim)
    angles = torch.arange(length, device=device)[:, None] * frequencies  # (T, hs/2)
    cos, sin = angles.cos(), angles.sin()

    def rotate(x):
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2).to(x.dtype)

    return rotate


class GPT(nn.Module):
    """nanoGPT-like with rotary positions: byte embeddings, pre-LN blocks, tied head."""

    def __init__(self, layers: int = 4, dim: int = 128, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        for module in self.modules():  # nanoGPT's init: small weights, so the tied head starts near uniform
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, tokens, attend=None):
        """``tokens (B, T)`` int64 -> logits ``(B, T, 256)``; ``attend(q, k, v, layer)`` defaults to causal SDPA."""
        attend = attend or (lambda q, k, v, layer: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        x = self.embed(tokens)
        rotate = rotary(tokens.shape[1], x.shape[-1] // self.blocks[0].heads, tokens.device)
        for layer, block in enumerate(self.blocks):
            x = block(x, lambda q, k, v, layer=layer: attend(q, k, v, layer), rotate)
        return self.norm(x) @ self.embed.weight.T  # (B, T, 256)
