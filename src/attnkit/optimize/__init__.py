"""`attnkit optimize`: rewrite a model's attention for speed and prove the result equivalent.

Example::

    from attnkit.optimize import optimize
    fast, report = optimize(model, (pixels,), dtype="bf16")
    print(report.dumps())
"""

from attnkit.optimize.api import backend_uses, measure_latency, optimize
from attnkit.optimize.config import PRESETS, OptimizeConfig
from attnkit.optimize.core import AttentionCore, BackendDecision
from attnkit.optimize.equivalence import check_equivalence
from attnkit.optimize.families import FAMILIES, Family, match_family
from attnkit.optimize.hf_attention import HFAttention
from attnkit.optimize.report import BackendUse, Check, Latency, OptimizationReport
from attnkit.optimize.patchify import PatchifyGEMM, is_patchify
from attnkit.optimize.rewrite import Rewrite, Skip, rewrite_modules
from attnkit.optimize.select import Candidate, Selection, pick, select_variant

__all__ = [
    # the entry point and its options
    "optimize",
    "OptimizeConfig",
    "PRESETS",
    # the report
    "OptimizationReport",
    "Rewrite",
    "Skip",
    "Check",
    "Latency",
    "BackendUse",
    "Selection",
    "Candidate",
    # building blocks
    "rewrite_modules",
    "check_equivalence",
    "measure_latency",
    "backend_uses",
    "HFAttention",
    "AttentionCore",
    "BackendDecision",
    "Family",
    "FAMILIES",
    "match_family",
    "PatchifyGEMM",
    "is_patchify",
    "select_variant",
    "pick",
]
