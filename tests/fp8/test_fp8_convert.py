"""convert_to_float8_training: what is swapped, what is kept and why, state_dict, reversion."""

import pytest
import torch
from torch import nn

from attnkit.fp8 import (Float8Linear, Float8TrainingConfig, conversion_plan, convert_from_float8_training,
                         convert_to_float8_training, keep_reason, load_speedup_table, table_speedup)


def _model():
    torch.manual_seed(0)
    return nn.ModuleDict({
        "proj": nn.Linear(64, 128),
        "block": nn.Sequential(nn.Linear(128, 128, bias=False), nn.GELU(), nn.Linear(128, 64)),
        "odd": nn.Linear(64, 10),           # 10 outputs: not 16-aligned
        "lm_head": nn.Linear(64, 256, bias=False),
    })


def test_converts_aligned_linears_and_keeps_keys_and_parameters():
    model = _model()
    keys = set(model.state_dict())
    weights = {name: p for name, p in model.named_parameters()}
    model = convert_to_float8_training(model, config=Float8TrainingConfig(),
                                       module_filter_fn=lambda m, fqn: fqn != "lm_head")
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds == {"proj": "Float8Linear", "block.0": "Float8Linear", "block.2": "Float8Linear",
                     "odd": "Linear", "lm_head": "Linear"}
    assert set(model.state_dict()) == keys
    assert all(p is weights[name] for name, p in model.named_parameters())  # shared, not copied


def test_plan_names_the_reason_each_layer_stays():
    plan = conversion_plan(_model(), module_filter_fn=lambda m, fqn: fqn != "lm_head")
    assert plan["proj"] is None and "not divisible by 16" in plan["odd"]
    assert plan["lm_head"] == "excluded by module_filter_fn"


def test_blockwise_needs_128_alignment():
    config = Float8TrainingConfig.from_recipe_name("blockwise", emulate=True)
    model = convert_to_float8_training(_model(), config=config)
    assert isinstance(model["block"][0], Float8Linear) and not isinstance(model["proj"], Float8Linear)


def test_reversion_is_bit_identical_and_round_trips_state():
    model = convert_to_float8_training(_model(), config=Float8TrainingConfig.from_recipe_name("delayed"))
    x = torch.randn(16, 64)
    model["proj"](x)  # fills the delayed history
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert "proj.fp8_amax_history" in state and state["proj.fp8_amax_history"][0, 0] > 0
    fresh = convert_to_float8_training(_model(), config=Float8TrainingConfig.from_recipe_name("delayed"))
    fresh.load_state_dict(state)
    assert torch.equal(fresh["proj"].fp8_amax_history, state["proj.fp8_amax_history"])
    plain = convert_from_float8_training(model)
    assert not any(isinstance(m, Float8Linear) for m in plain.modules())
    for name, p in plain.named_parameters():
        assert torch.equal(p, state[name])


def test_auto_filter_uses_the_measured_table():
    table = {"grid": {"M": [4096, 16384], "K": [1024, 4096], "N": [1024, 4096]},
             "speedup": {"tensorwise": {"16384x1024x1024": 0.7, "16384x1024x4096": 1.01,
                                        "16384x4096x1024": 1.2, "16384x4096x4096": 1.6}}}
    assert table_speedup("tensorwise", 20000, 5000, 5000, table) == 1.6  # floors to the grid point below
    assert table_speedup("delayed", 16384, 4096, 1024, table) == 1.2     # delayed reads tensorwise
    assert table_speedup("tensorwise", 16384, 512, 4096, table) is None  # below the grid
    assert table_speedup("rowwise", 16384, 4096, 4096, table) is None    # not measured
    config = Float8TrainingConfig(auto_filter=True, auto_filter_tokens=16384)
    big, mid, small = nn.Linear(4096, 4096), nn.Linear(1024, 4096), nn.Linear(512, 512)
    assert keep_reason(big, config, table) is None
    assert "1.01x" in keep_reason(mid, config, table)  # below the 1.05x margin
    assert "below the measured grid" in keep_reason(small, config, table)


def test_committed_table_keeps_small_layers_in_bf16():
    table = load_speedup_table()
    if not table["speedup"]:
        pytest.skip("speedup_table.json not committed")
    config = Float8TrainingConfig(auto_filter=True)
    assert keep_reason(nn.Linear(256, 256), config) is not None
    assert {"device", "torch", "date", "command"} <= set(table)
