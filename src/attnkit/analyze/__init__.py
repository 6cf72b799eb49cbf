"""``attnkit analyze``: count FLOPs and bytes, partition into kernels per execution mode, cost them on a
hardware profile, report (terminal, Markdown, JSON, HTML)."""

from attnkit.analyze.api import analyze
from attnkit.analyze.cost import KernelCost, ModeCost, estimate
from attnkit.analyze.flops import FLOP_CONVENTION, OpCost, count_ops
from attnkit.analyze.html import to_html
from attnkit.analyze.partition import MODES, Kernel, Partition, PartitionConfig, partition
from attnkit.analyze.render import StepProgress, render_report
from attnkit.analyze.report import SCHEMA_VERSION, AnalysisReport

__all__ = [
    # entry point
    "analyze",
    # counting, partitioning, cost
    "FLOP_CONVENTION", "OpCost", "count_ops", "MODES", "PartitionConfig", "Kernel", "Partition", "partition",
    "KernelCost", "ModeCost", "estimate",
    # reports
    "SCHEMA_VERSION", "AnalysisReport", "render_report", "StepProgress", "to_html",
]
