"""Which transformers attention modules `optimize` recognises, as data.

The five families share one structure (project, split heads, attend, maybe project out), so
they differ only in names: where the Q/K/V projections live, which children project the
output, and which keyword carries the mask. :class:`~attnkit.optimize.hf_attention.HFAttention`
reads everything else (heads, scale, dropout, causal flag, rotary, position bias, cache) from
the original module and its ``forward`` signature.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["Family", "FAMILIES", "match_family"]


@dataclass(frozen=True)
class Family:
    """How one transformers attention class is laid out."""

    name: str
    classes: tuple[str, ...]
    """Class names (as in ``type(module).__name__``) this entry covers."""
    qkv: tuple[str, str, str] | None
    """Child names of the separate Q, K, V projections (``nn.Linear``); None when already packed."""
    packed: str | None = None
    """Child name of an already packed projection (GPT-2's ``c_attn``, a ``Conv1D``)."""
    packed_cross_q: str | None = None
    """With ``packed``: the query projection used for cross attention (GPT-2's ``q_attn``)."""
    outputs: tuple[str, ...] = ()
    """Children applied, in order, to the merged heads (output projection, residual dropout)."""
    mask_arg: str = "attention_mask"
    cross_mask_arg: str | None = None
    """Keyword carrying the mask in cross attention when it differs (GPT-2's ``encoder_attention_mask``)."""
    kv_arg: str | None = "encoder_hidden_states"
    """Keyword carrying the key/value states of cross attention."""


FAMILIES: tuple[Family, ...] = (
    Family("bert", ("BertSelfAttention", "BertCrossAttention"), qkv=("query", "key", "value")),
    Family("vit", ("ViTAttention",), qkv=("q_proj", "k_proj", "v_proj"), outputs=("o_proj",), kv_arg=None),
    Family(
        "gpt2",
        ("GPT2Attention",),
        qkv=None,
        packed="c_attn",
        packed_cross_q="q_attn",
        outputs=("c_proj", "resid_dropout"),
        cross_mask_arg="encoder_attention_mask",
    ),
    Family("llama", ("LlamaAttention",), qkv=("q_proj", "k_proj", "v_proj"), outputs=("o_proj",), kv_arg=None),
    Family("t5", ("T5Attention",), qkv=("q", "k", "v"), outputs=("o",), mask_arg="mask", kv_arg="key_value_states"),
)


def match_family(module: nn.Module) -> Family | None:
    """The family of ``module`` if it is a recognised transformers attention, else None.

    Matches by class name and then checks the expected children exist, so a renamed or
    restructured class is reported as unrecognised rather than rewritten wrongly.
    """
    name = type(module).__name__
    for family in FAMILIES:
        if name not in family.classes:
            continue
        children = dict(module.named_children())
        needed = family.qkv or (family.packed,)
        if all(isinstance(children.get(child), nn.Module) for child in (*needed, *family.outputs)):
            return family
    return None
