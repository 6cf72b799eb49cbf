"""The model zoo: named models with random weights and example inputs, built from configs (no downloads).

Every model comes back in eval mode with weights drawn on the CPU from a fixed seed, so the same
``build_model`` call gives the same weights each time and on every device (and, in eval mode, the
same outputs on a given device). ``device="meta"`` builds shapes only (no weights drawn, no memory),
which is all ``attnkit analyze`` needs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace

import torch
from torch import nn

from attnkit.errors import check_arg, check_type, fail
from attnkit.models.base import ZooModel
from attnkit.utils.trees import cast_floating

__all__ = ["ZooModel", "build_model", "list_models", "default_seq_len"]

_SEED = 0
_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(frozen=True)
class _Entry:
    builder: str
    """``module:function`` inside ``attnkit.models``; called as ``f(batch_size, seq_len, dtype, attn_implementation)``
    and returning a ZooModel whose model is uninitialised and already in ``dtype`` (float buffers such as
    RoPE frequencies stay float32); its ``name`` is replaced by the registry key."""
    seq_len: int | None
    """Default sequence length; None where the input fixes it (images)."""
    max_seq_len: int | None = None
    """Longest sequence the model's position embeddings allow; None for no limit."""


_ZOO = {
    "vit_b_16": _Entry("vision:vit_b_16", None),
    "vit_l_16": _Entry("vision:vit_l_16", None),
    "bert-base": _Entry("text:bert_base", 128, 512),
    "gpt2": _Entry("text:gpt2", 1024, 1024),
    "llama-gqa": _Entry("text:llama_gqa", 256),
    "t5-small": _Entry("text:t5_small", 128),
    "nn-transformer": _Entry("torch_nn:nn_transformer", 128),
}


def list_models() -> list[str]:
    """Names that :func:`build_model` accepts (besides ``package.module:function``)."""
    return list(_ZOO)


def default_seq_len(name: str) -> int | None:
    """The sequence length :func:`build_model` uses for ``name`` when ``seq_len`` is None (None: fixed by the
    input, as for the ViTs, or unknown, as for ``package.module:function``)."""
    entry = _ZOO.get(name)
    return entry.seq_len if entry is not None else None


def build_model(
    name: str,
    *,
    batch_size: int = 1,
    seq_len: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> ZooModel:
    """Build a zoo model with random weights (fixed seed) and example inputs.

    Args:
        name: one of :func:`list_models`, or ``package.module:function`` naming a function that
            returns a :class:`ZooModel` or ``(model, example_inputs)``; it gets ``batch_size`` and
            ``seq_len`` as keywords when its signature has them.
        batch_size: leading dimension of the example inputs.
        seq_len: tokens per example (defaults per model: bert 128, gpt2 1024, llama 256, t5 128,
            nn.Transformer 128); must be None for the ViTs, whose 224x224 images fix 197 tokens.
        dtype: floating dtype of the weights and floating inputs (integer token ids stay int64).
        device: where the model and inputs live; weights are drawn on the CPU, so they match across devices.
            ``"meta"``: shapes only, nothing allocated and no weights drawn (zoo models are constructed on
            the meta device; a user function is called under ``torch.device("meta")``, or, if it fails
            there, normally and then moved), so any sequence length builds instantly.
        attn_implementation: ``"sdpa"`` (default) or ``"eager"`` (explicit matmul-softmax-matmul) for
            transformers models; models built on ``nn.MultiheadAttention`` ignore it and say so in ``notes``,
            user models keep whatever attention their function built.

    Returns:
        A :class:`ZooModel` in eval mode.

    Example::

        zm = build_model("bert-base", batch_size=2, seq_len=64)
        out = zm.model(*zm.example_inputs, **zm.example_kwargs)
    """
    check_type(name, str, "name")
    check_type(batch_size, int, "batch_size")
    check_arg(batch_size >= 1, "batch_size", "a positive int", batch_size)
    check_type(dtype, torch.dtype, "dtype")
    check_arg(dtype.is_floating_point, "dtype", "a floating dtype such as torch.float32 or torch.bfloat16", dtype)
    check_type(device, (str, torch.device), "device")
    check_arg(
        attn_implementation in (None, *_ATTN_IMPLEMENTATIONS),
        "attn_implementation",
        f"None or one of {list(_ATTN_IMPLEMENTATIONS)}",
        attn_implementation,
    )
    if seq_len is not None:
        check_type(seq_len, int, "seq_len")
        check_arg(seq_len >= 1, "seq_len", "a positive int or None", seq_len)
    try:
        device = torch.device(device)
    except RuntimeError:
        fail("device", "a torch device such as 'cpu', 'cuda' or 'cuda:1'", device)

    if ":" in name:
        from attnkit.models.user import build_user_model

        zoo_model = build_user_model(name, batch_size=batch_size, seq_len=seq_len, dtype=dtype, meta=device.type == "meta")
    else:
        zoo_model = _build_registered(name, batch_size, seq_len, dtype, attn_implementation or "sdpa", device.type == "meta")
    zoo_model.model.eval().to(device=device)
    return replace(
        zoo_model,
        example_inputs=cast_floating(tuple(zoo_model.example_inputs), dtype, device),
        example_kwargs=cast_floating(dict(zoo_model.example_kwargs), dtype, device),
    )


def _build_registered(
    name: str, batch_size: int, seq_len: int | None, dtype: torch.dtype, attn: str, meta: bool
) -> ZooModel:
    entry = _ZOO.get(name)
    if entry is None:
        fail("name", f"one of {list_models()} or 'package.module:function'", name)
    if entry.seq_len is None:
        fixed = f"None for {name!r} (224x224 images with 16x16 patches fix 197 tokens)"
        check_arg(seq_len is None, "seq_len", fixed, seq_len)
    else:
        seq_len = entry.seq_len if seq_len is None else seq_len
        if entry.max_seq_len is not None:
            check_arg(seq_len <= entry.max_seq_len, "seq_len", f"at most {entry.max_seq_len} for {name!r}", seq_len)
    module_name, function_name = entry.builder.split(":")
    builder = getattr(importlib.import_module(f"attnkit.models.{module_name}"), function_name)
    if meta:  # every tensor the builder makes (weights, buffers, inputs) is a shape without storage
        with torch.device("meta"):
            return replace(builder(batch_size, seq_len, dtype, attn), name=name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        zoo_model = builder(batch_size, seq_len, dtype, attn)
        _random_init_(zoo_model.model)
    return replace(zoo_model, name=name)


@torch.no_grad()
def _random_init_(model: nn.Module, std: float = 0.02) -> None:
    """Fill every parameter with uniform noise of standard deviation ``std`` (norm scales: 1 + noise).

    The builders construct without the libraries' own (slow) initialisers; uniform noise drawn in
    float32 costs ~2 s for ViT-L's 300M parameters on 2 CPU cores and gives the same values in every dtype.
    """
    bound = std * 3**0.5
    seen: set[int] = set()  # tied weights (e.g. GPT-2's lm_head and wte) are drawn once
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            # drawn in float32 (in place when the model is float32) so every dtype gets the same values
            noise = param if param.dtype == torch.float32 else torch.empty(param.shape)
            noise.uniform_(-bound, bound)
            if is_norm and param_name == "weight":
                noise += 1
            if noise is not param:
                param.copy_(noise)

