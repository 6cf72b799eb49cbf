"""An independent float64 multi-head attention for tests: one head at a time, masks in torch's
convention, written without attnkit so it can judge it."""

from __future__ import annotations

import torch

from attnkit.nn import MultiHeadAttention


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter (biases too, which start at zero) random non-zero values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * 0.4)
    return module


def _as_additive(mask: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    """torch convention (bool True = masked out, float added) -> float64 additive, broadcast to ``shape``."""
    if mask is None:
        return torch.zeros(shape, dtype=torch.float64)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(mask, float("-inf"))
    return mask.double().expand(shape)


def reference_mha(
    module: MultiHeadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-first ``(B, S, E)`` inputs -> ``(out (B, Sq, E), weights (B, Hq, Sq, Skv_total))`` in float64."""
    cfg = module.config
    params = {name: p.double() for name, p in module.named_parameters()}
    heads, group, d, dv = cfg.num_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim, cfg.v_head_dim
    if cfg.packed:
        w_q, w_k, w_v = params["in_proj_weight"].split(cfg.proj_sizes)
    else:
        w_q, w_k, w_v = params["q_proj_weight"], params["k_proj_weight"], params["v_proj_weight"]
    b_q, b_k, b_v = params["in_proj_bias"].split(cfg.proj_sizes) if cfg.bias else (0.0, 0.0, 0.0)
    q, k, v = query.double() @ w_q.T + b_q, key.double() @ w_k.T + b_k, value.double() @ w_v.T + b_v
    batch, seq_q, seq_kv = q.shape[0], q.shape[1], k.shape[1]

    shape = (batch, heads, seq_q, seq_kv)
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.reshape(shape)
    scores_bias = _as_additive(attn_mask, shape).clone()
    if key_padding_mask is not None:
        scores_bias += _as_additive(key_padding_mask[:, None, None, :], shape)
    if is_causal:
        for i in range(seq_q):
            scores_bias[:, :, i, max(0, i + seq_kv - seq_q + 1) :] = float("-inf")
    extra = []
    if cfg.add_bias_kv:
        extra.append((params["bias_k"].expand(batch, 1, -1), params["bias_v"].expand(batch, 1, -1)))
    if cfg.add_zero_attn:
        extra.append((k.new_zeros(batch, 1, k.shape[2]), v.new_zeros(batch, 1, v.shape[2])))
    for extra_k, extra_v in extra:
        k, v = torch.cat([k, extra_k], 1), torch.cat([v, extra_v], 1)
        scores_bias = torch.nn.functional.pad(scores_bias, (0, 1))

    outs, weights = [], []
    for h in range(heads):
        g = h // group
        scores = q[..., h * d : (h + 1) * d] @ k[..., g * d : (g + 1) * d].transpose(1, 2) * cfg.softmax_scale
        probs = torch.softmax(scores + scores_bias[:, h], dim=-1).nan_to_num(0.0)  # empty rows -> zeros
        if dropout_mask is not None:
            probs = probs * dropout_mask.expand(batch, heads, -1, -1)[:, h] / (1 - cfg.dropout)
        weights.append(probs)
        outs.append(probs @ v[..., g * dv : (g + 1) * dv])
    out = torch.cat(outs, dim=-1) @ params["out_proj.weight"].T
    if cfg.bias:
        out = out + params["out_proj.bias"]
    return out, torch.stack(weights, dim=1)
