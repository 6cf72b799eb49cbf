"""Finding attention, two ways: on a graph (capture a model with ``torch.export``, on fake tensors when it has
no data; match its attention into :class:`AttentionSite` records; read mask values; decompose fused attention
into primitive steps) and at run time (every SDPA call, through a ``TorchFunctionMode``). Both describe a site
with the one :class:`SiteRecord` that analyze, optimize and validate share."""

from attnkit.discover.attention import AttentionSite, find_attention
from attnkit.discover.capture import CapturedGraph, capture
from attnkit.discover.decompose import DecomposedGraph, decompose_attention
from attnkit.discover.site import SiteRecord
from attnkit.discover.runtime import AttentionCall, AttentionInterceptor, intercept_attention

__all__ = [
    # capture
    "CapturedGraph", "capture",
    # attention sites: the shared record, and the graph's own
    "SiteRecord", "AttentionSite", "find_attention",
    # decomposition
    "DecomposedGraph", "decompose_attention",
    # run-time interception
    "AttentionCall", "AttentionInterceptor", "intercept_attention",
]
