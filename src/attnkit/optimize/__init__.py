"""`attnkit optimize`: rewrite a model's attention for speed and prove the result equivalent.

Example::

    from attnkit.optimize import optimize
    fast, report = optimize(model, (pixels,), dtype="bf16")
    print(report.dumps())
"""

from attnkit.optimize.api import measure_latency, optimize
from attnkit.optimize.config import COMPILE_MODES, PRESETS, OptimizeConfig
from attnkit.optimize.equivalence import check_equivalence
from attnkit.optimize.fuse import FusedLinear, FusedProjection, FusionGroup, FusionPlan, FusionRefusal, apply_fusion, plan_fusion
from attnkit.optimize.hf_interface import ATTNKIT, ATTNKIT_EAGER_MASKS, InterfaceCall, attnkit_attention_forward, record_calls, register
from attnkit.optimize.report import BackendUse, Check, Float8Accuracy, Float8Variant, Latency, OptimizationReport
from attnkit.optimize.patchify import PatchifyGEMM, is_patchify
from attnkit.optimize.rewrite import Rewrite, Skip, rewrite_modules
from attnkit.optimize.save import load_optimized, save_optimized
from attnkit.optimize.select import MIN_GAIN, Candidate, Selection, build_variants, pick, select_variant, variant_name

__all__ = [
    # the entry point and its options
    "optimize",
    "OptimizeConfig",
    "PRESETS",
    "COMPILE_MODES",
    # saving and reloading
    "save_optimized",
    "load_optimized",
    # the report
    "OptimizationReport",
    "Rewrite",
    "Skip",
    "Check",
    "Latency",
    "BackendUse",
    "Selection",
    "Candidate",
    "Float8Variant",
    "Float8Accuracy",
    # building blocks
    "rewrite_modules",
    "check_equivalence",
    "measure_latency",
    "PatchifyGEMM",
    "is_patchify",
    "select_variant",
    "pick",
    "build_variants",
    "variant_name",
    "MIN_GAIN",
    # projection fusion
    "plan_fusion",
    "apply_fusion",
    "FusionPlan",
    "FusionGroup",
    "FusionRefusal",
    "FusedLinear",
    "FusedProjection",
    # transformers' attention interface
    "ATTNKIT",
    "ATTNKIT_EAGER_MASKS",
    "attnkit_attention_forward",
    "register",
    "record_calls",
    "InterfaceCall",
]
