"""Float8TrainStep: skips steps with non-finite gradients, counts overflow, backs delayed scales off."""

import torch
from torch import nn

from attnkit.fp8 import Float8TrainingConfig, Float8TrainStep, convert_to_float8_training


def _setup(recipe="delayed"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    model = convert_to_float8_training(model, config=Float8TrainingConfig.from_recipe_name(recipe))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, Float8TrainStep(model, opt)


def test_trains_and_skips_an_overflowing_step():
    model, opt, step = _setup()
    x = torch.randn(64, 32)
    target = x @ torch.randn(32, 16) / 4  # learnable
    losses = []
    for i in range(12):
        xi = x.clone()
        if i == 5:
            xi[0, 0] = float("inf")  # planted overflow
        loss = nn.functional.mse_loss(model(xi), target)
        before = [p.detach().clone() for p in model.parameters()]
        loss.backward()
        took = step()
        if i == 5:
            assert not took and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            assert (model[0].fp8_amax_history == 0).all()  # scales backed off: history cleared
        else:
            assert took
            losses.append(loss.item())
    assert step.stats.skipped == 1 and step.stats.steps == 11
    assert step.stats.overflow_x >= 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.9 * losses[0]


def test_counters_round_trip():
    _, _, step = _setup("tensorwise")
    step.stats.skipped, step.stats.steps = 2, 7
    other = _setup("tensorwise")[2]
    other.load_state_dict(step.state_dict())
    assert other.stats == step.stats
