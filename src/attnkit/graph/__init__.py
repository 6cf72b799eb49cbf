"""``attnkit analyze``: capture, attention discovery, decomposition, partitioning, cost model, reports."""

from attnkit.graph.analyze import analyze
from attnkit.graph.attention import AttentionSite, find_attention
from attnkit.graph.calibrate import calibrate
from attnkit.graph.calibrate_cpu import calibrate_cpu
from attnkit.graph.capture import CapturedGraph, capture
from attnkit.graph.cost import KernelCost, ModeCost, estimate
from attnkit.graph.decompose import DecomposedGraph, decompose_attention
from attnkit.graph.flops import FLOP_CONVENTION, OpCost, count_ops
from attnkit.graph.hardware import HardwareProfile, list_hardware
from attnkit.graph.html import to_html
from attnkit.graph.partition import MODES, Kernel, Partition, PartitionConfig, partition
from attnkit.graph.profile import ProfileRecord, ProfileResult, load_measured, profile_models
from attnkit.graph.render import render_report
from attnkit.graph.report import SCHEMA_VERSION, AnalysisReport
from attnkit.graph.this_machine import load_hardware, this_machine

__all__ = [
    # entry point
    "analyze",
    # capture, attention discovery, decomposition
    "CapturedGraph", "capture", "AttentionSite", "find_attention", "DecomposedGraph", "decompose_attention",
    # counting, partitioning, cost
    "FLOP_CONVENTION", "OpCost", "count_ops", "MODES", "PartitionConfig", "Kernel", "Partition", "partition",
    "HardwareProfile", "list_hardware", "load_hardware", "KernelCost", "ModeCost", "estimate",
    # reports
    "SCHEMA_VERSION", "AnalysisReport", "render_report", "to_html",
    # measurement (GPU, or this CPU)
    "calibrate", "calibrate_cpu", "this_machine", "profile_models", "ProfileRecord", "ProfileResult", "load_measured",
]
