"""`attnkit validate`: prove an attention setup is correct and fast before you ship it.

Stages: compatibility (environment, per-layer backend support with reasons), accuracy
(forward and q/k/v gradients of every backend against float64, judged against PyTorch's
math algorithm in the same dtype; the whole model's output with each backend forced),
performance (latency percentiles, throughput, TFLOP/s, peak memory over a batch x sequence
sweep), torch.compile and autocast, and recommendations backed by those numbers.
"""

from attnkit.validate.accuracy import AccuracyResult, ErrorStats, check_attention, check_model_output
from attnkit.validate.api import validate
from attnkit.validate.compatibility import Environment, LayerSupport
from attnkit.validate.compile_amp import CompileAmpResult
from attnkit.validate.config import PRESETS, STAGES, ValidateConfig
from attnkit.validate.intercept import force_backend
from attnkit.validate.performance import PerfResult
from attnkit.validate.plots import save_plots
from attnkit.validate.recommend import Recommendation
from attnkit.validate.render import markdown, render
from attnkit.validate.report import SCHEMA, ValidationReport
from attnkit.validate.sites import AttentionLayer, find_layers

__all__ = [
    # entry point and settings
    "validate",
    "ValidateConfig",
    "PRESETS",
    "STAGES",
    # building blocks (usable alone, e.g. to test a custom kernel)
    "check_attention",
    "check_model_output",
    "find_layers",
    "force_backend",
    # the report
    "ValidationReport",
    "SCHEMA",
    "Environment",
    "AttentionLayer",
    "LayerSupport",
    "AccuracyResult",
    "ErrorStats",
    "PerfResult",
    "CompileAmpResult",
    "Recommendation",
    "render",
    "markdown",
    "save_plots",
]
