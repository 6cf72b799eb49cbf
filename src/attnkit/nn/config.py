"""`MultiHeadAttentionConfig`: the shape and behaviour of one attention layer, checked once.

Defaults resolve in ``__post_init__`` so every field is concrete afterwards (``head_dim``
from ``embed_dim // num_heads``, ``num_kv_heads`` from ``num_heads``, ...).
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass

from attnkit.errors import check_arg
from attnkit.ops import BACKENDS
from attnkit.sparse import ContentAware, Pattern

__all__ = ["MultiHeadAttentionConfig"]


@dataclass(frozen=True)
class MultiHeadAttentionConfig:
    """Hyper-parameters of :class:`attnkit.nn.MultiHeadAttention`.

    The first nine fields are ``nn.MultiheadAttention``'s constructor arguments, in its order and
    with its defaults; attnkit's extras are keyword-only.

    Projections: ``q = query @ Wq (E -> Hq*D)``, ``k = key @ Wk (kdim -> Hkv*D)``,
    ``v = value @ Wv (vdim -> Hkv*Dv)``, ``out = attn @ Wo (Hq*Dv -> E)``.
    """

    embed_dim: int
    """E: feature size of the query and of the output."""
    num_heads: int
    """Hq: query heads."""
    dropout: float = 0.0
    """Dropout probability on the attention weights, in training mode only."""
    bias: bool = True
    """Biases on the input and output projections."""
    add_bias_kv: bool = False
    """Append one learned key and value to every sequence (as ``nn.MultiheadAttention``)."""
    add_zero_attn: bool = False
    """Append one all-zero key and value to every sequence (as ``nn.MultiheadAttention``)."""
    kdim: int | None = None
    """Feature size of ``key``. Defaults to ``embed_dim``."""
    vdim: int | None = None
    """Feature size of ``value``. Defaults to ``embed_dim``."""
    batch_first: bool = False
    """Inputs are ``(B, S, E)`` when True, ``(S, B, E)`` when False (torch's default)."""
    _: KW_ONLY
    num_kv_heads: int | None = None
    """Hkv: key/value heads, a divisor of ``num_heads`` (GQA; 1 = MQA). Defaults to ``num_heads``."""
    head_dim: int | None = None
    """D: query/key head size. Defaults to ``embed_dim // num_heads`` (must divide)."""
    v_head_dim: int | None = None
    """Dv: value head size. Defaults to ``head_dim``."""
    scale: float | None = None
    """Softmax scale. Defaults to ``1 / sqrt(head_dim)``."""
    backend: str = "auto"
    """``attnkit.ops`` backend for the attention core (``"auto"`` picks per call)."""
    query_chunk_size: int | None = None
    """Process queries in chunks of this many rows to bound memory; exact (every chunk sees all its keys)."""
    sparsity: Pattern | ContentAware | None = None
    """Block-sparse attention through :func:`attnkit.sparse.sparse_attention`: a static pattern
    (e.g. ``SlidingWindow(2048)``) or a :class:`~attnkit.sparse.ContentAware` selection. None: dense."""

    def __post_init__(self) -> None:
        # Fill defaults through object.__setattr__ because the dataclass is frozen.
        for name in ("embed_dim", "num_heads"):
            value = getattr(self, name)
            check_arg(isinstance(value, int) and value >= 1, name, "an int >= 1", value)
        if self.head_dim is None:
            check_arg(
                self.embed_dim % self.num_heads == 0,
                "embed_dim",
                f"a multiple of num_heads={self.num_heads}",
                self.embed_dim,
                "Pass head_dim explicitly for heads that do not tile embed_dim.",
            )
        defaults = {
            "num_kv_heads": self.num_heads,
            "kdim": self.embed_dim,
            "vdim": self.embed_dim,
            "head_dim": self.embed_dim // self.num_heads,
        }
        for name, default in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.v_head_dim is None:
            object.__setattr__(self, "v_head_dim", self.head_dim)
        for name in ("num_kv_heads", "kdim", "vdim", "head_dim", "v_head_dim"):
            value = getattr(self, name)
            check_arg(isinstance(value, int) and value >= 1, name, "an int >= 1", value)
        check_arg(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            f"a divisor of num_heads={self.num_heads}",
            self.num_kv_heads,
            "Query head h uses KV head h // (num_heads // num_kv_heads).",
        )
        check_arg(0.0 <= self.dropout < 1.0, "dropout", "a float in [0, 1)", self.dropout)
        check_arg(self.scale is None or self.scale > 0, "scale", "None or a float > 0", self.scale)
        check_arg(self.backend == "auto" or self.backend in BACKENDS, "backend", f"'auto' or one of {sorted(BACKENDS)}", self.backend)
        check_arg(
            self.query_chunk_size is None or (isinstance(self.query_chunk_size, int) and self.query_chunk_size >= 1),
            "query_chunk_size",
            "None or an int >= 1",
            self.query_chunk_size,
        )
        if self.sparsity is not None:
            self._check_sparsity()

    def _check_sparsity(self) -> None:
        check_arg(isinstance(self.sparsity, (Pattern, ContentAware)), "sparsity",
                  "None, a sparsity Pattern (e.g. SlidingWindow(256)) or a ContentAware config", self.sparsity)
        conflicts = {
            "add_bias_kv": (self.add_bias_kv, "its extra key has no position in the pattern"),
            "add_zero_attn": (self.add_zero_attn, "its extra key has no position in the pattern"),
            "dropout": (self.dropout > 0, "the sparse backend has no dropout"),
            "backend": (self.backend not in ("auto", "sparse"), "sparsity runs on the 'sparse' backend"),
            "query_chunk_size": (self.query_chunk_size is not None, "the sparse backend already bounds memory by blocks"),
        }
        for name, (conflict, why) in conflicts.items():
            check_arg(not conflict, name, f"its default with sparsity ({why})", getattr(self, name),
                      f"Drop {name}, or sparsity=None for dense attention.")

    @property
    def packed(self) -> bool:
        """One ``in_proj_weight`` for q, k and v (possible when ``kdim == vdim == embed_dim``)."""
        return self.kdim == self.embed_dim and self.vdim == self.embed_dim

    @property
    def proj_sizes(self) -> tuple[int, int, int]:
        """Output sizes of the q, k and v projections: ``(Hq*D, Hkv*D, Hkv*Dv)``."""
        return (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.v_head_dim)

    @property
    def softmax_scale(self) -> float:
        """``scale``, or ``1 / sqrt(head_dim)`` when unset."""
        return self.scale if self.scale is not None else self.head_dim**-0.5
