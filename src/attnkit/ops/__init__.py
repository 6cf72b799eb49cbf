"""Exact attention with interchangeable backends (`attention()`), its weights (`attention_weights()`),
and why each backend can or cannot run.

See docs/architecture.md for the contract (shapes, mask conventions, bottom-right causal).
"""

from attnkit.ops.attention import attention, attention_weights
from attnkit.ops.auto import RULES, BackendChoice, Rule, select_backend
from attnkit.ops.inputs import attention_spec
from attnkit.ops.masks import causal_mask
from attnkit.ops.registry import BACKENDS, Backend, backend_support
from attnkit.ops.spec import MASK_KINDS, AttentionSpec

__all__ = [
    # the op
    "attention",
    "attention_weights",
    # describing a call
    "AttentionSpec",
    "MASK_KINDS",
    "attention_spec",
    "causal_mask",
    # backends and choosing one
    "BACKENDS",
    "Backend",
    "backend_support",
    "select_backend",
    "BackendChoice",
    "Rule",
    "RULES",
]
