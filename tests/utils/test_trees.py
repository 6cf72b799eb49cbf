from collections import OrderedDict, namedtuple

import torch

from attnkit.utils import cast_floating

Pair = namedtuple("Pair", "a b")


def test_cast_floating_casts_only_floating_tensors_and_keeps_containers():
    x, ids, mask = torch.randn(2, 3), torch.tensor([[1, 2, 3]]), torch.tensor([True, False])
    tree = {"x": x, "nested": [Pair(x, ids), (mask, 3, "text")], "od": OrderedDict(y=x.double())}
    out = cast_floating(tree, torch.bfloat16)
    assert out["x"].dtype == torch.bfloat16 and torch.equal(out["x"], x.to(torch.bfloat16))
    pair = out["nested"][0]
    assert isinstance(pair, Pair) and pair.a.dtype == torch.bfloat16 and pair.b is ids  # token ids untouched
    assert out["nested"][1][0] is mask and out["nested"][1][1:] == (3, "text")
    assert isinstance(out["od"], OrderedDict) and out["od"]["y"].dtype == torch.bfloat16
    assert x.dtype == torch.float32  # the input tree is not changed


def test_cast_floating_none_keeps_tensors_and_device_moves_all():
    x, ids = torch.randn(4), torch.arange(3)
    same = cast_floating((x, ids))
    assert same[0] is x and same[1] is ids
    moved = cast_floating((x, ids), device="meta")
    assert all(t.is_meta for t in moved) and moved[0].dtype == torch.float32 and moved[1].dtype == torch.int64
