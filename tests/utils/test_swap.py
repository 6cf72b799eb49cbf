"""swap_modules: the one module swap (filter gets (module, fqn); shared modules stay shared)."""

import pytest
import torch
from torch import nn

from attnkit.errors import InvalidTypeError
from attnkit.utils import swap_modules


class _Tagged(nn.Module):
    def __init__(self, inner: nn.Module, fqn: str):
        super().__init__()
        self.inner, self.fqn = inner, fqn

    def forward(self, x):
        return self.inner(x)


def _model():
    shared = nn.Linear(4, 4)
    return nn.Sequential(nn.Linear(4, 4), nn.Sequential(shared, nn.ReLU(), shared), nn.ModuleList([nn.Linear(4, 4)]))


def test_swaps_by_filter_with_fqn_and_keeps_sharing():
    model = _model()
    seen = []
    out = swap_modules(model, lambda m, fqn: seen.append(fqn) or isinstance(m, nn.Linear), _Tagged)
    assert out is model
    assert isinstance(model[0], _Tagged) and model[0].fqn == "0"
    assert model[1][0] is model[1][2] and isinstance(model[1][0], _Tagged) and model[1][0].fqn == "1.0"
    assert isinstance(model[2][0], _Tagged) and model[2][0].fqn == "2.0"
    assert "" in seen and "1.1" in seen and "0.inner" not in seen  # replaced modules are not descended into
    x = torch.randn(2, 4)
    torch.testing.assert_close(model[0](x), model[0].inner(x))


def test_factory_none_keeps_and_descends_and_root_can_swap():
    model = _model()
    swap_modules(model, lambda m, fqn: fqn in ("1", "1.1"), lambda m, fqn: None if fqn == "1" else nn.GELU())
    assert isinstance(model[1][1], nn.GELU)
    root = nn.Linear(2, 2)
    assert isinstance(swap_modules(root, lambda m, fqn: fqn == "", _Tagged), _Tagged)


def test_rejects_non_module():
    with pytest.raises(InvalidTypeError, match="model"):
        swap_modules("not a module", lambda m, f: True, lambda m, f: m)
