"""Float8TrainingConfig: string enums, presets, cross-field checks."""

import pytest
import torch

from attnkit.errors import InvalidArgumentError
from attnkit.fp8 import Float8Format, Float8TrainingConfig, Recipe


def test_defaults_are_e4m3_forward_e5m2_gradients():
    config = Float8TrainingConfig()
    assert config.recipe is Recipe.TENSORWISE
    assert config.forward_format.dtype == torch.float8_e4m3fn
    assert config.grad_format.dtype == torch.float8_e5m2
    assert config.block_size == 16


def test_strings_become_enums_and_are_checked():
    config = Float8TrainingConfig(recipe="delayed", grad_format="e4m3", amax_history_len=4)
    assert config.recipe is Recipe.DELAYED and config.grad_format is Float8Format.E4M3
    with pytest.raises(InvalidArgumentError, match="recipe"):
        Float8TrainingConfig(recipe="columnwise")


@pytest.mark.parametrize("name", ["tensorwise", "rowwise", "rowwise_with_gw_hp", "blockwise", "delayed"])
def test_presets(name):
    config = Float8TrainingConfig.from_recipe_name(name, emulate=True)
    assert config.recipe.value == name and config.emulate
    assert config.block_size == (128 if name == "blockwise" else 16)


@pytest.mark.parametrize("kwargs, parameter", [
    ({"amax_history_len": 8}, "amax_history_len"),              # history without the delayed recipe
    ({"recipe": "delayed", "amax_history_len": 0}, "amax_history_len"),
    ({"recipe": "blockwise", "power_of_2_scales": True}, "power_of_2_scales"),
    ({"auto_filter": True, "emulate": True}, "auto_filter"),
    ({"recipe": "blockwise"}, "grad_format"),                     # cuBLAS blockwise: E4M3 only
    ({"auto_filter_tokens": 8}, "auto_filter_tokens"),
])
def test_cross_field_checks_name_the_parameter(kwargs, parameter):
    with pytest.raises(InvalidArgumentError) as err:
        Float8TrainingConfig(**kwargs)
    assert err.value.parameter == parameter


def test_unknown_preset():
    with pytest.raises(InvalidArgumentError, match="name"):
        Float8TrainingConfig.from_recipe_name("mxfp8")
