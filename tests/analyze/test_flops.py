"""FLOPs and bytes per node: unit shapes, and zoo totals against FlopCounterMode numbers measured on CUDA."""

import pytest
import torch
import torch.nn.functional as F
import torch.utils.flop_counter

from attnkit.discover.capture import capture
from attnkit.analyze.flops import count_ops


def _ops(module, *inputs, dtype=torch.float32, causal=()):
    captured = capture(module, inputs)
    return count_ops(captured.graph_module.graph, dtype, causal)


class _Attend(torch.nn.Module):
    def __init__(self, causal):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


def test_linear_is_two_flops_per_multiply_add_and_bytes_follow_the_dtype():
    linear = torch.nn.Linear(48, 80)
    x = torch.randn(3, 7, 48)
    (op,) = [o for o in _ops(linear, x) if o.category == "gemm"]
    assert op.flops == op.dense_flops == 2 * 3 * 7 * 48 * 80
    assert op.bytes_read == 4 * (3 * 7 * 48 + 80 * 48 + 80) and op.bytes_written == 4 * 3 * 7 * 80
    (half,) = [o for o in _ops(linear, x, dtype=torch.bfloat16) if o.category == "gemm"]
    assert half.bytes_read * 2 == op.bytes_read


def test_conv_and_matmul_and_einsum():
    conv = torch.nn.Conv2d(3, 16, kernel_size=5, stride=5)
    (op,) = [o for o in _ops(conv, torch.randn(2, 3, 35, 35)) if o.category == "conv"]
    assert op.flops == 2 * (2 * 16 * 7 * 7) * (3 * 5 * 5)

    class _Products(torch.nn.Module):
        def forward(self, a, b):
            return a @ b, torch.einsum("bij,bjk->bik", a, b)

    a, b = torch.randn(4, 9, 11), torch.randn(4, 11, 13)
    gemms = [o for o in _ops(_Products(), a, b) if o.category == "gemm"]
    assert [o.flops for o in gemms] == [2 * 4 * 9 * 11 * 13] * 2


@pytest.mark.parametrize(
    "module, shape",
    [
        (torch.nn.ConvTranspose2d(4, 6, kernel_size=3, stride=2, groups=2), (2, 4, 5, 7)),
        (torch.nn.ConvTranspose1d(3, 5, kernel_size=4, stride=3, output_padding=1), (2, 3, 9)),
        (torch.nn.ConvTranspose3d(2, 4, kernel_size=2, stride=2), (1, 2, 3, 4, 5)),
        (torch.nn.Conv2d(4, 6, kernel_size=3, groups=2, padding=1), (2, 4, 5, 7)),
    ],
    ids=["transpose2d-groups", "transpose1d", "transpose3d", "conv2d-groups"],
)
def test_convolutions_match_flop_counter(module, shape):
    """Transposed convolutions spread each input element over Cout/g * k outputs (they counted 0 before)."""
    x = torch.randn(*shape)
    (op,) = [o for o in _ops(module, x) if o.category == "conv"]
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        module(x)
    assert op.flops == op.dense_flops == counter.get_total_flops() > 0


@pytest.mark.parametrize("causal", [False, True])
def test_attention_counted_by_shape_and_causal_halved(causal):
    q, k, v = torch.randn(2, 3, 97, 40), torch.randn(2, 3, 33, 40), torch.randn(2, 3, 33, 24)
    (op,) = [o for o in _ops(_Attend(causal), q, k, v) if o.category == "attention"]
    dense = 2 * 2 * 3 * 97 * 33 * (40 + 24)
    assert op.dense_flops == dense
    assert op.flops == (dense // 2 if causal else dense)


def test_views_and_eval_dropout_cost_nothing():
    class _Shuffle(torch.nn.Module):
        def forward(self, x):
            return F.dropout(x.view(6, 10).transpose(0, 1).T.mT, 0.5, training=False).unsqueeze(0).broadcast_to(2, 10, 6)

    ops = _ops(_Shuffle(), torch.randn(60))
    assert {o.category for o in ops} <= {"view", "noop"}
    assert sum(o.bytes_read + o.bytes_written + o.flops for o in ops) == 0


# name, build kwargs, target GFLOP (FlopCounterMode on CUDA, attention non-causal), layers left out of the target
_TARGETS = [
    ("vit_b_16", {"batch_size": 2}, 2 * 35.13, ()),  # batch 2: the capture shared with the other tests
    ("bert-base", {"batch_size": 1, "seq_len": 128}, 22.35, ()),
    ("gpt2", {"batch_size": 1, "seq_len": 1024}, 212.6, ("lm_head",)),  # the target is GPT2Model: no LM head
]


@pytest.fixture(scope="module", params=_TARGETS, ids=[t[0] for t in _TARGETS])
def zoo_counts(request):
    name, kwargs, target, excluded = request.param
    _, captured, sites = request.getfixturevalue("captured_zoo")(name, **kwargs)
    causal = {n for site in sites if site.causal for n in site.core}
    return name, count_ops(captured.graph_module.graph, torch.float32, causal), target, excluded, sites


def test_zoo_totals_match_flop_counter_within_1_percent(zoo_counts):
    name, ops, target, excluded, sites = zoo_counts
    dense = sum(o.dense_flops for o in ops if o.layer not in excluded) / 1e9
    assert dense == pytest.approx(target, rel=0.01), name
    attention = sum(o.dense_flops for o in ops if o.category == "attention")
    expected = sum(4 * s.batch * s.num_heads * s.seq_q * s.seq_kv * s.head_dim_qk for s in sites)
    assert attention == expected
    causal_halves = sum(o.dense_flops - o.flops for o in ops)
    assert causal_halves == (attention // 2 if name == "gpt2" else 0)
    for layer in excluded:  # GPT-2's LM head: counted by us, left out of the GPT2Model target
        (head,) = [o for o in ops if o.layer == layer and o.category == "gemm"]
        assert head.flops == 2 * 1024 * 768 * 50257

