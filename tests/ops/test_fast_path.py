"""`attention()`'s per-call memo: hits skip checks and selection, results stay bit-identical, bad calls still raise.

A "miss" is the first call of a key (full checks, then remembered); a "hit" repeats it.
Hits are proven by making the full path fail: if ``attention_spec`` ran, the test would raise.
"""

import dataclasses
import importlib
import math
import warnings

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkit.errors import InvalidArgumentError, InvalidTypeError, UnsupportedError
from attnkit.ops import BACKENDS, attention, select_backend
from attnkit.ops import calls as calls_module
from attnkit.ops import registry
from attnkit.ops import sdpa as sdpa_module
from attnkit.ops.calls import CALLS, forget_calls

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# `attnkit.ops.attention` is the function there; the module is reached by name.
attention_module = importlib.import_module("attnkit.ops.attention")

_SDP_FLAGS = ("flash", "mem_efficient", "math", "cudnn")


def _sdp_flags() -> tuple[bool, ...]:
    return tuple(getattr(torch._C, f"_get_{name}_sdp_enabled")() for name in _SDP_FLAGS)


@pytest.fixture
def fresh_memo(monkeypatch):
    """An empty memo, and runtime rejections that do not leak into other tests."""
    monkeypatch.setattr(registry, "_RUNTIME_REJECTIONS", {})
    select_backend.cache_clear()
    yield
    select_backend.cache_clear()


def _forbid_full_path(monkeypatch):
    """From now on, a call that takes the full path fails the test."""
    monkeypatch.setattr(attention_module, "attention_spec", lambda *args, **kwargs: pytest.fail("the full path ran on a hit"))


def _qkv(batch=2, heads_q=4, heads_kv=2, seq_q=9, seq_kv=11, dim=16, dim_v=16, *, requires_grad=False):
    q = torch.randn(batch, heads_q, seq_q, dim)
    k, v = torch.randn(batch, heads_kv, seq_kv, dim), torch.randn(batch, heads_kv, seq_kv, dim_v)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


Q, K, V = _qkv()
BOOL_MASK = torch.rand(2, 1, 9, 11) > 0.3


# (first call kwargs that succeed, second call that must fail, the error and its parameter)
BAD_SECOND_CALLS = {
    "batch": ({}, ((Q, K[:1], V[:1]), {}), InvalidArgumentError, "k.shape[0] (batch)"),
    "head-dim": ({}, ((Q, K[..., :8], V), {}), InvalidArgumentError, "k.shape[3] (head dim)"),
    "kv-heads": ({}, ((Q[:, :3], K, V), {}), InvalidArgumentError, "k.shape[1] (KV heads)"),
    "v-seq": ({}, ((Q, K, V[:, :, :3]), {}), InvalidArgumentError, "v.shape[2] (sequence)"),
    "dtype": ({}, ((Q, K.double(), V), {}), InvalidArgumentError, "k.dtype"),
    "mask-shape": ({"mask": BOOL_MASK}, ((Q, K, V), {"mask": BOOL_MASK[..., :5]}), InvalidArgumentError, "mask"),
    "mask-dtype": ({"mask": BOOL_MASK}, ((Q, K, V), {"mask": BOOL_MASK.long()}), InvalidArgumentError, "mask.dtype"),
    "causal-int": ({"causal": True}, ((Q, K, V), {"causal": 1}), InvalidTypeError, "causal"),
    "return-lse-int": ({"return_lse": False}, ((Q, K, V), {"return_lse": 0}), InvalidTypeError, "return_lse"),
    "dropout-true": ({"dropout_p": 0}, ((Q, K, V), {"dropout_p": True}), InvalidArgumentError, "dropout_p"),
    "dropout-one": ({"dropout_p": 0.5, "dropout_mask": BOOL_MASK}, ((Q, K, V), {"dropout_p": 1.0, "dropout_mask": BOOL_MASK}), InvalidArgumentError, "dropout_p"),
    "scale-nan": ({"scale": 0.5}, ((Q, K, V), {"scale": math.nan}), InvalidArgumentError, "scale"),
    "scale-negative": ({"scale": 0.5}, ((Q, K, V), {"scale": -0.5}), InvalidArgumentError, "scale"),
    "backend": ({"backend": "math"}, ((Q, K, V), {"backend": "maths"}), InvalidArgumentError, "backend"),
    "not-a-tensor": ({}, ((Q, K, V.numpy()), {}), InvalidTypeError, "v"),
}


@pytest.mark.parametrize("case", BAD_SECOND_CALLS)
def test_a_remembered_call_does_not_vouch_for_a_different_bad_one(case, fresh_memo):
    first, (args, kwargs), error, parameter = BAD_SECOND_CALLS[case]
    for _ in range(2):  # miss, then hit: both remembered as valid
        attention(Q, K, V, **first)
    for _ in range(2):  # the bad call raises every time, so it was never remembered
        with pytest.raises(error) as info:
            attention(*args, **kwargs)
        assert info.value.parameter == parameter


def test_a_forced_backend_still_refuses_a_new_shape(fresh_memo):
    q, k, v = _qkv(dim=8, dim_v=8)
    attention(q, k, v, backend="flash")
    with pytest.raises(UnsupportedError, match="flash needs D == Dv"):
        attention(q, k, v[..., :4], backend="flash")


# (tensor shapes as in _qkv, options); awkward sizes, GQA, every mask kind, lse, dropout masks.
CASES = {
    "plain": ((1, 2, 2, 7, 7, 16, 16), {}),
    "causal-gqa": ((2, 4, 2, 9, 13, 16, 16), {"causal": True}),
    "decode": ((1, 4, 1, 1, 17, 32, 32), {"causal": True}),
    "bool-empty-row": ((2, 2, 2, 17, 17, 59, 59), {"mask": "bool"}),
    "additive-causal-dv": ((2, 2, 2, 17, 29, 24, 40), {"mask": "additive", "causal": True}),
    "scale": ((1, 2, 2, 5, 9, 16, 16), {"scale": 0.3}),
    "dropout-mask": ((1, 4, 1, 17, 23, 16, 16), {"dropout_p": 0.3, "dropout_mask": True}),
}


def _options(shape, options):
    batch, heads_q, _, seq_q, seq_kv, _, _ = shape
    options = dict(options)
    if options.get("mask") == "bool":
        mask = torch.rand(batch, 1, seq_q, seq_kv) > 0.3
        mask[..., seq_q // 2, :] = False  # a query with no allowed key
        options["mask"] = mask
    elif options.get("mask") == "additive":
        options["mask"] = torch.randn(heads_q, 1, seq_kv)
    if options.pop("dropout_mask", False):
        options["dropout_mask"] = torch.rand(batch, heads_q, seq_q, seq_kv) > options["dropout_p"]
    return options


def _outputs(q, k, v, options, backend, return_lse):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    result = attention(q, k, v, **options, backend=backend, return_lse=return_lse)
    out, lse = result if return_lse else (result, None)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return [out.detach(), lse, q.grad, k.grad, v.grad]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["auto", "flash", "math", "chunked", "flex", "reference"])
@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "lse"])
def test_a_hit_is_bit_identical_to_the_full_path(case, backend, return_lse, fresh_memo, monkeypatch):
    shape, options = CASES[case]
    q, k, v = _qkv(*shape)
    options = _options(shape, options)
    try:
        missed = _outputs(q, k, v, options, backend, return_lse)
    except UnsupportedError as error:
        pytest.skip(str(error)[:200])
    assert len(CALLS) == 1
    _forbid_full_path(monkeypatch)
    hit = _outputs(q, k, v, options, backend, return_lse)
    for name, x, expected in zip(["out", "lse", "dq", "dk", "dv"], hit, missed):
        assert (x is None) == (expected is None), name
        if x is not None:
            assert torch.equal(x, expected), name


def test_random_dropout_draws_the_same_on_a_hit(fresh_memo, monkeypatch):
    q, k, v = _qkv()
    torch.manual_seed(3)
    missed = attention(q, k, v, dropout_p=0.4, backend="math")
    _forbid_full_path(monkeypatch)
    torch.manual_seed(3)
    assert torch.equal(attention(q, k, v, dropout_p=0.4, backend="math"), missed)


def test_the_key_separates_what_decides_validity_and_choice(fresh_memo):
    q, k, v = _qkv(requires_grad=True)
    with torch.no_grad():
        attention(q, k, v)
    attention(q, k, v)
    attention(q.detach(), k.detach(), v.detach())
    attention(q, k, v, scale=1)
    attention(q, k, v, scale=1.0)  # 1 == 1.0: the same key, and the same checks
    assert [known.spec.requires_grad for known in CALLS.values()] == [False, True, False, True]
    assert len(CALLS) == 4


def test_subclasses_and_other_scalar_types_take_the_full_path(fresh_memo):
    q, k, v = _qkv()
    attention(torch.nn.Parameter(q), k, v)
    attention(q, k, v, scale=np.float64(0.5))
    assert not CALLS
    attention(q, k, v, mask=torch.nn.Parameter(torch.zeros(9, 11)))  # a learned bias may be a Parameter
    assert len(CALLS) == 1


def test_the_memo_is_bounded_least_recently_used_first(fresh_memo, monkeypatch):
    monkeypatch.setattr(calls_module, "MAX_CALLS", 3)
    tensors = {seq: _qkv(seq_q=seq, seq_kv=seq) for seq in range(1, 6)}
    for seq in (1, 2, 3):
        attention(*tensors[seq])
    attention(*tensors[1])  # 1 is now the most recently used
    attention(*tensors[4])  # evicts 2
    assert [known.spec.seq_q for known in CALLS.values()] == [3, 1, 4]


def test_cache_clear_and_runtime_rejections_empty_the_memo(fresh_memo):
    attention(*_qkv())
    select_backend.cache_clear()
    assert not CALLS
    attention(*_qkv())
    registry.record_runtime_rejection("flex", next(iter(CALLS.values())).spec, "pretend")
    assert not CALLS
    forget_calls()


def test_auto_falls_back_on_a_hit_when_the_kernel_starts_refusing(fresh_memo, monkeypatch):
    q, k, v = _qkv(seq_q=6, seq_kv=6)
    expected = attention(q, k, v, backend="math")
    forget_calls()
    torch.testing.assert_close(attention(q, k, v), expected)
    ((_, known),) = CALLS.items()
    assert known.backend == "flash"

    def refuse(*args, **kwargs):
        raise UnsupportedError("torch has no FLASH_ATTENTION kernel for this call: pretend")

    monkeypatch.setattr(sdpa_module, "_cpu_flash", refuse)  # the kernel behind the remembered run
    assert torch.equal(attention(q, k, v), expected)  # a hit on flash, which refuses: auto runs the next
    ((_, known),) = CALLS.items()
    assert known.backend == "math" and "pretend" in registry.backend_support(known.spec, known.layout)["flash"]
    assert registry.backend_support(known.spec)["flash"] is None  # only this layout remembers the refusal
    _forbid_full_path(monkeypatch)
    assert torch.equal(attention(q, k, v), expected)  # and remembers that


def test_the_sdpa_backends_leave_the_global_flags_alone(fresh_memo, monkeypatch):
    """The fused kernels are called directly: no process-wide SDPA flag changes, even when one refuses."""
    before = _sdp_flags()
    flips = []
    monkeypatch.setattr(torch._C, "_set_sdp_use_flash", lambda enabled: flips.append(enabled))
    q, k, v = _qkv(heads_kv=4)
    attention(q, k, v, backend="flash")
    attention(q, k, v, mask=BOOL_MASK, causal=True, backend="flash")
    # Pretend the static rule missed flash's D == Dv: the kernel refuses, named as such.
    monkeypatch.setitem(BACKENDS, "flash", dataclasses.replace(BACKENDS["flash"], support=lambda spec: None))
    with pytest.raises(UnsupportedError, match="flash kernel refused"):
        attention(q, k, v[..., :8], backend="flash")
    with sdpa_kernel(SDPBackend.MATH):
        inside = _sdp_flags()
        torch.testing.assert_close(attention(q, k, v, backend="flash"), attention(q, k, v, backend="math"))
        assert _sdp_flags() == inside
    assert _sdp_flags() == before and flips == [False, True]  # only sdpa_kernel itself flipped flash


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_compile_and_export_trace_the_full_path(fresh_memo):
    q, k, v = _qkv()
    mask = BOOL_MASK

    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return attention(q, k, v, mask=mask, causal=True)

    expected = Attend()(q, k, v)
    forget_calls()
    torch._dynamo.reset()
    compiled = torch.compile(Attend(), backend="eager", fullgraph=True)
    assert torch.equal(compiled(q, k, v), expected)
    for strict in (True, False):
        exported = torch.export.export(Attend(), (q, k, v), strict=strict)
        torch.testing.assert_close(exported.module()(q, k, v), expected, rtol=0, atol=0)
    assert not CALLS  # nothing traced was remembered


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "cudnn", "flash", "efficient", "math"])
def test_a_hit_is_bit_identical_on_cuda(backend, fresh_memo):
    q, k, v = (torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    before = _sdp_flags()
    results = []
    for _ in range(2):  # miss, hit
        out = attention(q, k, v, causal=True, backend=backend)
        results.append([out.detach(), *torch.autograd.grad(out.float().square().sum(), (q, k, v))])
    assert len(CALLS) == 1 and _sdp_flags() == before
    for name, hit, miss in zip(["out", "dq", "dk", "dv"], *results[::-1]):
        assert torch.equal(hit, miss), name


def test_mask_that_allows_everything_runs_as_unmasked():
    """An all-True bool mask or an all-zero additive mask is dropped (exact), so the call takes the
    unmasked path; a mask with one blocked score is kept (planted: dropping it would change the output)."""
    op = importlib.import_module("attnkit.ops.attention")  # the module (the package attribute is the function)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, dtype=torch.float64) for _ in range(3))
    unmasked = attention(q, k, v, backend="reference")
    for mask in (torch.ones(2, 1, 9, 9, dtype=torch.bool), torch.zeros(2, 1, 9, 9, dtype=torch.float64)):
        assert op._allows_everything(mask)
        torch.testing.assert_close(attention(q, k, v, mask=mask), unmasked, rtol=1e-12, atol=1e-12)
    blocked = torch.ones(2, 1, 9, 9, dtype=torch.bool)
    blocked[0, 0, 3, 5] = False
    assert not op._allows_everything(blocked)
    masked = attention(q, k, v, mask=blocked)
    torch.testing.assert_close(masked, attention(q, k, v, mask=blocked, backend="reference"), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(masked, unmasked)
    blocked[0, 0, 3, 5] = True  # in-place edit: the cached verdict is rebuilt (version counter)
    assert op._allows_everything(blocked)
    assert not op._allows_everything(torch.zeros(1, 1, 2, 2, requires_grad=True))  # a learned bias stays
    with torch.inference_mode():  # no version counter, no cache: not checked (a sync per call), still exact
        inference_mask = torch.ones(2, 1, 9, 9, dtype=torch.bool)
        assert not op._allows_everything(inference_mask)
        torch.testing.assert_close(attention(q, k, v, mask=inference_mask), unmasked, rtol=1e-12, atol=1e-12)


def test_masks_made_in_inference_mode_work():
    """Inference tensors have no version counter; per-mask caching must not touch it."""
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    with torch.inference_mode():
        mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
        mask[..., 0, 4] = False
        out = attention(q, k, v, mask=mask)
        everything = torch.ones(1, 1, 5, 5, dtype=torch.bool)
        torch.testing.assert_close(attention(q, k, v, mask=everything), attention(q, k, v), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, attention(q, k, v, mask=mask.clone(), backend="reference").float(), rtol=1e-5, atol=1e-5)
