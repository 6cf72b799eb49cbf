"""FP8 training on ``torch._scaled_mm``: recipes, ``Float8Linear``, model conversion, the step helper.

Usage (torchao's convention)::

    config = Float8TrainingConfig.from_recipe_name("tensorwise", auto_filter=True)
    model = convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn != "lm_head")
    # multi-GPU: fully_shard(...) each block after conversion; enable_fsdp_float8_all_gather=True gathers FP8 weights
    model = torch.compile(model)          # optional: eager mode casts with fused Triton kernels on CUDA
    step = Float8TrainStep(model, optimizer)
    loss.backward(); step()
"""

from attnkit.fp8.auto_filter import keep_reason, load_speedup_table, table_speedup
from attnkit.fp8.config import Float8Format, Float8TrainingConfig, Recipe
from attnkit.fp8.convert import conversion_plan, convert_from_float8_training, convert_to_float8_training
from attnkit.fp8.fsdp import Float8AllGatheredWeight, WeightWithFloat8AllGather
from attnkit.fp8.fused import Float8FusedLinear
from attnkit.fp8.gemm import fp8_unavailable, native_blockwise_support, native_support, scaled_gemm
from attnkit.fp8.linear import Float8Linear
from attnkit.fp8.report import Float8LayerPlan, Float8Report, float8_report
from attnkit.fp8.scaling import Granularity, Quantized, dequantize, quantize, sqnr
from attnkit.fp8.train import Float8StepStats, Float8TrainStep

__all__ = [
    # configuration
    "Float8TrainingConfig", "Recipe", "Float8Format",
    # model conversion
    "convert_to_float8_training", "convert_from_float8_training", "conversion_plan", "Float8Linear",
    "Float8FusedLinear",
    # FSDP2 (fully_shard) with FP8 all-gather of the weights: Float8TrainingConfig(enable_fsdp_float8_all_gather=True)
    "WeightWithFloat8AllGather", "Float8AllGatheredWeight",
    # what conversion would do (attnkit fp8 MODEL)
    "float8_report", "Float8Report", "Float8LayerPlan",
    # automatic layer filter
    "keep_reason", "table_speedup", "load_speedup_table",
    # training step
    "Float8TrainStep", "Float8StepStats",
    # numerics building blocks
    "quantize", "dequantize", "Quantized", "Granularity", "scaled_gemm", "native_support", "native_blockwise_support", "fp8_unavailable", "sqnr",
]
