"""What FP8 conversion would do to a model, before running it: per GEMM layer converted or kept (and why),
the measured speed-up at its shape, and the overall effect on the layers' GEMM time.

Shapes are ``M x K x N`` with ``M`` the tokens of one step (batch x sequence), ``K``/``N`` the layer's
in/out features. Speed-ups come from the measured table of :mod:`attnkit.fp8.auto_filter` (fwd+bwd,
compiled). The overall figure weights each layer by its GEMM FLOPs (bf16 time taken as proportional
to FLOPs) and covers these GEMMs only, not attention, norms or the optimizer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from attnkit.fp8.auto_filter import load_speedup_table, table_speedup
from attnkit.fp8.config import Float8TrainingConfig
from attnkit.fp8.convert import conversion_plan

__all__ = ["Float8LayerPlan", "Float8Report", "float8_report"]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Float8LayerPlan:
    """One GEMM layer of the model."""

    name: str
    """Module path."""
    kind: str
    """Module class: ``Linear``, ``FusedLinear`` (optimize's fused Q/K/V) or a GEMM that is not one."""
    m: int
    k: int
    n: int
    """GEMM shape ``M x K x N``: tokens x in_features x out_features."""
    params: int
    """Weight and bias elements."""
    flops: int
    """Forward + backward GEMM FLOPs per step: ``3 * 2 * M * K * N``."""
    converted: bool
    reason: str | None
    """Why it stays in high precision (None when converted)."""
    speedup: float | None
    """Measured fwd+bwd speed-up of FP8 at the grid point at or below this shape; None below the grid."""


@dataclass(frozen=True)
class Float8Report:
    """The plan for a whole model: :attr:`layers` plus shares and the predicted speed-up of their GEMMs."""

    model: str
    recipe: str
    hardware: str
    table_device: str
    """The GPU the speed table was measured on."""
    tokens: int
    """M: tokens per step."""
    layers: tuple[Float8LayerPlan, ...]

    @property
    def param_share(self) -> float:
        """Fraction of the GEMM layers' parameters that train in FP8."""
        total = sum(layer.params for layer in self.layers)
        return sum(layer.params for layer in self.layers if layer.converted) / total if total else 0.0

    @property
    def flop_share(self) -> float:
        """Fraction of the GEMM layers' FLOPs that run in FP8."""
        total = sum(layer.flops for layer in self.layers)
        return sum(layer.flops for layer in self.layers if layer.converted) / total if total else 0.0

    @property
    def speedup(self) -> float:
        """Predicted speed-up of all these GEMMs together (kept layers at 1.0x)."""
        before = sum(layer.flops for layer in self.layers)
        after = sum(layer.flops / (layer.speedup if layer.converted and layer.speedup else 1.0) for layer in self.layers)
        return before / after if after else 1.0

    def to_json(self) -> dict:
        """A JSON-ready dict (``schema_version`` 1)."""
        return {"schema_version": SCHEMA_VERSION, "model": self.model, "recipe": self.recipe, "hardware": self.hardware,
                "table_device": self.table_device, "tokens": self.tokens, "param_share": self.param_share,
                "flop_share": self.flop_share, "speedup": self.speedup,
                "layers": [asdict(layer) for layer in self.layers]}  # fmt: skip


def _gemm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that hold one GEMM weight: plain/fused linears (planned), and transformers' ``Conv1D`` (GPT-2)."""
    found = {}
    for fqn, module in model.named_modules():
        if type(module) is nn.Linear or type(module).__name__ in ("FusedLinear", "Conv1D"):
            found[fqn] = module
    return found


def _shape(module: nn.Module) -> tuple[int, int]:
    if type(module).__name__ == "Conv1D":  # weight (in, out), the transpose of nn.Linear's
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


def float8_report(model: nn.Module, *, tokens: int, recipe: str = "tensorwise", hardware: str = "h100",
                  name: str = "") -> Float8Report:  # fmt: skip
    """The FP8 plan of ``model`` at ``tokens`` tokens per step under ``recipe`` with the automatic filter.

    Args:
        model: any module; only shapes are read (a ``meta`` model is fine).
        tokens: M, tokens per step (batch x sequence), >= 16.
        recipe: a :class:`~attnkit.fp8.Recipe` name.
        hardware: the GPU the plan is for (reported; the table's device is reported beside it).

    Example::

        report = float8_report(model, tokens=16384, recipe="tensorwise")
        print(f"{report.flop_share:.0%} of GEMM FLOPs in FP8, {report.speedup:.2f}x")
    """
    config = Float8TrainingConfig.from_recipe_name(recipe, auto_filter=True, auto_filter_tokens=tokens)
    plan = conversion_plan(model, config=config)
    layers = []
    for fqn, module in _gemm_layers(model).items():
        k, n = _shape(module)
        reason = plan.get(fqn, f"{type(module).__name__} is not an nn.Linear: not converted")
        params = sum(p.numel() for p in module.parameters(recurse=False))
        layers.append(Float8LayerPlan(fqn, type(module).__name__, tokens, k, n, params, 6 * tokens * k * n,
                                      reason is None, reason, table_speedup(config.recipe, tokens, k, n)))  # fmt: skip
    return Float8Report(name or type(model).__name__, config.recipe.value, hardware,
                        load_speedup_table().get("device", "unknown"), tokens, tuple(layers))  # fmt: skip
