"""Exact attention with interchangeable backends (`attention()`), its weights (`attention_weights()`),
why each backend can or cannot run, and the pieces ring and sparse attention build on.

See docs/architecture.md for the contract (shapes, mask conventions, bottom-right causal, positions).
"""

from attnkit.ops.attention import attention, attention_weights
from attnkit.ops.auto import RULES, BackendChoice, Rule, select_backend
from attnkit.ops.cache import clear_caches
from attnkit.ops.inputs import attention_spec
from attnkit.ops.kernels import backward_from_lse, forward_with_lse
from attnkit.ops.lse import merge_partials
from attnkit.ops.masks import causal_mask
from attnkit.ops.options import AttentionOptions
from attnkit.ops.registry import BACKENDS, Backend, backend_support, register_backend, unregister_backend
from attnkit.ops.spec import MASK_KINDS, AttentionSpec

__all__ = [
    # the op
    "attention",
    "attention_weights",
    "AttentionOptions",
    # describing a call
    "AttentionSpec",
    "MASK_KINDS",
    "attention_spec",
    "causal_mask",
    # backends and choosing one
    "BACKENDS",
    "Backend",
    "register_backend",
    "unregister_backend",
    "backend_support",
    "select_backend",
    "BackendChoice",
    "Rule",
    "RULES",
    "clear_caches",
    # blocks with their log-sum-exp (ring and sparse attention)
    "forward_with_lse",
    "backward_from_lse",
    "merge_partials",
]
