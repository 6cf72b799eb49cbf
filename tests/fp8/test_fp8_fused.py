"""FP8 conversion of ``optimize``'s fused projections: a tiny Llama, fused Q/K/V, then FP8.

SQNR floors (emulated tensorwise FP8, fp32 model): the whole model's last hidden state >= 20 dB
against the unconverted fused model, the fused QKV weight gradient >= 18 dB (measured: 25.5 and 22.7 dB;
the errors of 2 layers x 4 FP8 GEMMs add up).
"""

from __future__ import annotations

import pytest
import torch

from attnkit.fp8 import (Float8FusedLinear, Float8Linear, Float8TrainingConfig, conversion_plan,
                         convert_from_float8_training, convert_to_float8_training, sqnr)
from attnkit.optimize import FusedProjection, OptimizeConfig, optimize
from attnkit.optimize.fuse import FusedLinear

transformers = pytest.importorskip("transformers")

OUT_FLOOR_DB, GRAD_FLOOR_DB = 20.0, 18.0
CONFIG = Float8TrainingConfig(emulate=True)
QKV = "layers.0.self_attn.fused_q_proj_k_proj_v_proj"


def _fused_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    model = transformers.LlamaModel(config)
    ids = torch.randint(0, 97, (2, 8))  # M = 16 tokens: aligned, so every converted GEMM runs in FP8
    keys = list(model.state_dict())
    fused, report = optimize(model, (ids,), config=OptimizeConfig(check=False, measure=False))
    assert report.fusion is not None and len(report.fusion.groups) == 2  # qkv x 2 layers (gate/up stay separate)
    return fused, ids, keys


def _forward_backward(model, ids):
    model.zero_grad()
    out = model(ids).last_hidden_state
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    qkv = model.get_submodule(QKV)
    return out.detach(), qkv.weight.grad.clone()


def test_fused_groups_convert_as_one_fp8_gemm():
    model, ids, keys = _fused_llama()
    ref_out, ref_grad = _forward_backward(model, ids)
    plan = conversion_plan(model, config=CONFIG)
    assert plan[QKV] is None and plan["layers.0.mlp.gate_proj"] is None

    model = convert_to_float8_training(model, config=CONFIG)
    groups = [m for m in model.modules() if isinstance(m, FusedLinear)]
    assert len(groups) == 2 and all(type(g) is Float8FusedLinear for g in groups)
    members = [m for m in model.modules() if isinstance(m, FusedProjection)]
    assert len(members) == 6 and all(type(m._group) is Float8FusedLinear for m in members)  # no stale group
    assert all(type(model.get_submodule(f"layers.0.mlp.{n}")) is Float8Linear for n in ("gate_proj", "up_proj", "down_proj"))
    assert list(model.state_dict()) == keys  # the original model's keys

    out, grad = _forward_backward(model, ids)
    assert torch.isfinite(out).all()
    out_db, grad_db = sqnr(ref_out, out), sqnr(ref_grad, grad)
    assert OUT_FLOOR_DB <= out_db < 60, out_db  # FP8 ran (not bit-exact) and stayed accurate
    assert GRAD_FLOOR_DB <= grad_db < 60, grad_db


def test_only_the_fused_gemm_in_fp8_changes_the_output():
    """Planted check: converting just the fused groups must change the output (their GEMM really is FP8)."""
    model, ids, _ = _fused_llama()
    ref_out, _ = _forward_backward(model, ids)
    model = convert_to_float8_training(model, config=CONFIG, module_filter_fn=lambda m, fqn: isinstance(m, FusedLinear))
    assert not any(isinstance(m, Float8Linear) for m in model.modules())
    out, _ = _forward_backward(model, ids)
    assert OUT_FLOOR_DB <= sqnr(ref_out, out) < 60


def test_reversion_is_bit_identical_and_state_dict_round_trips():
    model, ids, keys = _fused_llama()
    ref_out, _ = _forward_backward(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model = convert_to_float8_training(model, config=CONFIG)
    model.load_state_dict(state)  # original keys load into the converted model
    model = convert_from_float8_training(model)
    assert not any(isinstance(m, (Float8FusedLinear, Float8Linear)) for m in model.modules())
    assert all(type(m._group) is FusedLinear for m in model.modules() if isinstance(m, FusedProjection))
    out, _ = _forward_backward(model, ids)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    assert list(model.state_dict()) == keys


def test_delayed_history_of_a_fused_group_saves_loads_and_backs_off():
    """The fused group's amax history is in the state dict (strict round trip), and the step helper
    counts its overflow and clears its history like a Float8Linear's."""
    from attnkit.fp8 import Float8TrainStep

    model, ids, _ = _fused_llama()
    model = convert_to_float8_training(model, config=Float8TrainingConfig(emulate=True, recipe="delayed"))
    qkv = model.get_submodule(QKV)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = Float8TrainStep(model, opt)
    model(ids).last_hidden_state.sum().backward()
    assert step() and (qkv.fp8_amax_history[:, 0] > 0).all()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.equal(state[f"{QKV}.fp8_amax_history"], qkv.fp8_amax_history)
    qkv.fp8_amax_history.zero_()
    model.load_state_dict(state)  # strict: every key of its own state dict
    assert torch.equal(qkv.fp8_amax_history, state[f"{QKV}.fp8_amax_history"])

    with torch.no_grad():
        qkv.weight[0, 0] = float("inf")  # planted overflow in the fused weight only
    model(ids).last_hidden_state.sum().backward()
    assert not step()
    assert step.stats.overflow_weight == 1  # the fused group's weight, counted once
    assert (qkv.fp8_amax_history == 0).all()  # scales backed off
