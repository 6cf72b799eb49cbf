"""Finding attention, two ways: on a graph (capture a model with ``torch.export``, on fake tensors when it has
no data; match its attention into :class:`AttentionSite` records; read mask values; decompose fused attention
into primitive steps) and at run time (every SDPA call, through a ``TorchFunctionMode``)."""

from attnkit.discover.attention import AttentionSite, find_attention
from attnkit.discover.capture import CapturedGraph, capture
from attnkit.discover.decompose import DecomposedGraph, decompose_attention
from attnkit.discover.runtime import AttentionCall, AttentionInterceptor, intercept_attention

__all__ = [
    # capture
    "CapturedGraph", "capture",
    # attention sites
    "AttentionSite", "find_attention",
    # decomposition
    "DecomposedGraph", "decompose_attention",
    # run-time interception
    "AttentionCall", "AttentionInterceptor", "intercept_attention",
]
