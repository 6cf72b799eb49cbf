"""Kernel groups: measured CUDA kernel names and predicted kernels land in the same groups."""

import pytest

from attnkit.analyze.groups import GROUPS, measured_group, memory_kind, predicted_group
from attnkit.analyze.partition import Kernel


# Names as torch.profiler reported them for torchvision ViT-B/16 on the H100
# (benchmarks/results/env-probe-h100-2026-11-22.json), and inductor's Triton kernel names.
@pytest.mark.parametrize("name, group", [
    ("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN", "gemm"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float,", "norm"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::GeluCUDAKernelImpl(at::Tenso", "elementwise"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false", "attention"),
    ("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16_128x128_32", "conv"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, fal", "conv"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespa", "other"),
    ("triton_per_fused_add_native_layer_norm_3", "norm"),
    ("triton_poi_fused_gelu_4", "elementwise"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
])
def test_measured_kernel_names(name, group):
    assert measured_group(name) == group


@pytest.mark.parametrize("name, category, kind, group", [
    ("linear", "gemm", "gemm", "gemm"),
    ("linear+linear+linear", "qkv-gemm", "qkv-gemm", "gemm"),
    ("scaled_dot_product_attention", "attention", "attention", "attention"),
    ("add+layer_norm", "reduction", "norm", "norm"),
    ("gelu", "pointwise", "activation", "elementwise"),
    ("add", "pointwise", "pointwise", "elementwise"),
    ("softmax", "reduction", "softmax", "elementwise"),
    ("cat", "copy", "copy", "other"),
    ("embedding+add+...", "gather", "gather", "other"),
])
def test_predicted_kernels(name, category, kind, group):
    kernel = Kernel(name, category, ("n",), 0, 1, 0, "(top)")
    assert (memory_kind(kernel), predicted_group(kernel)) == (kind, group)
    assert group in GROUPS
