"""torch's fused inference kernel (``attnkit.nn.fast_path``): exactly torch's numbers where
nn.MultiheadAttention runs it, attnkit's contract for fully padded sequences, and the general path
(checked against the float64 reference) for every call just outside it.

Tolerances: the fused path is compared bitwise with torch (the same kernel on the same arguments);
anything against the float64 reference uses 1e-5 in fp32 and 1e-10 in fp64 (plain rounding at these
sizes is ~1e-7 and ~1e-16).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import attnkit.nn.fast_path as fast_path_module
import attnkit.nn.multihead as multihead_module
from attnkit.errors import InvalidArgumentError
from attnkit.nn import MultiHeadAttention, from_torch
from attnkit.nn.fast_path import why_not_fast_path
from mha_reference import randomize_, reference_mha

B, S, E, H = 3, 7, 24, 4  # even heads (torch's fast path needs them), head_dim 6
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
CONTEXTS = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}


def pair(dtype=torch.float32, device="cpu", **kwargs) -> tuple[nn.MultiheadAttention, MultiHeadAttention]:
    """torch's layer and ours in eval, same random state dict (non-zero biases)."""
    kwargs = {"batch_first": True} | kwargs
    theirs = randomize_(nn.MultiheadAttention(E, H, **kwargs), seed=1).to(device=device, dtype=dtype).eval()
    ours = MultiHeadAttention(E, H, **kwargs, device=device, dtype=dtype).eval()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def make_input(dtype=torch.float32, device="cpu", batch_first=True, seed=2) -> torch.Tensor:
    x = torch.randn(B, S, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x if batch_first else x.transpose(0, 1)).to(device=device, dtype=dtype)


def padding(device="cpu", full_row: bool = False) -> torch.Tensor:
    """Bool (B, S), True = padding: ragged tails, and batch element 2 all padding if ``full_row``."""
    mask = torch.zeros(B, S, dtype=torch.bool, device=device)
    mask[0, -3:] = mask[1, -1] = True
    if full_row:
        mask[2] = True
    return mask


class PassThrough(TorchFunctionMode):
    """A torch function mode that changes nothing (as attnkit.discover's interceptor, for other calls)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def general_path_only(monkeypatch):
    """Fail the test if torch's fused kernel runs."""
    with monkeypatch.context() as patch:
        patch.setattr(fast_path_module, "_native", lambda *args: pytest.fail("the fused kernel ran"))
        yield


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "padding_bool"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_path_equals_torch_bitwise(dtype, masked, context, monkeypatch):
    theirs, ours = pair(dtype)
    x = make_input(dtype)
    kwargs = {"key_padding_mask": padding()} if masked else {}
    # The general path must not run: the layer goes straight to the kernel.
    monkeypatch.setattr(multihead_module, "attend", lambda *args, **kw: pytest.fail("the general path ran"))
    with CONTEXTS[context]():
        assert why_not_fast_path(ours, x, x, x, need_weights=False, **kwargs) is None
        got, weights = ours(x, x, x, need_weights=False, **kwargs)
        want, _ = theirs(x, x, x, need_weights=False, **kwargs)
    assert weights is None and got.dtype == dtype and got.shape == (B, S, E)
    assert torch.equal(got, want)
    reference, _ = reference_mha(ours, x, x, x, key_padding_mask=kwargs.get("key_padding_mask"))
    torch.testing.assert_close(got, reference.to(dtype), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_fused_path_with_frozen_weights_and_grad_enabled():
    """torch's rule: grad mode alone does not block the kernel, a tensor that needs a gradient does."""
    theirs, ours = pair()
    x = make_input()
    ours.requires_grad_(False)
    assert why_not_fast_path(ours, x, x, x, need_weights=False) is None
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)
    ours.requires_grad_(True)
    assert "autograd" in why_not_fast_path(ours, x, x, x, need_weights=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fully_padded_sequence_gives_zero_attention_not_nan(dtype):
    """The kernel gives NaN for a batch element with no key; attnkit's contract is zero attention,
    so that row is the output bias, as on the general path (torch's fast path switched off)."""
    _, ours = pair(dtype)
    x, mask = make_input(dtype), padding(full_row=True)
    with torch.inference_mode():
        got, _ = ours(x, x, x, key_padding_mask=mask, need_weights=False)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            assert why_not_fast_path(ours, x, x, x, key_padding_mask=mask, need_weights=False) is not None
            general, _ = ours(x, x, x, key_padding_mask=mask, need_weights=False)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert torch.isfinite(got).all()
    assert torch.equal(got[2], ours.out_proj.bias.detach().expand(S, E))
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, general, rtol=tol, atol=tol)
    reference, _ = reference_mha(ours, x, x, x, key_padding_mask=mask)
    torch.testing.assert_close(got, reference.to(dtype), rtol=tol, atol=tol)


# Calls just outside torch's fast path (or outside what keeps attnkit's contract): the general path,
# against the float64 reference. Each gives (constructor overrides, call kwargs, words of the reason).
OUTSIDE = {
    "gqa": (dict(num_kv_heads=2), {}, "heads"),
    "odd_heads": (dict(num_heads=3), {}, "odd num_heads"),
    "seq_first": (dict(batch_first=False), {}, "batch_first"),
    "no_bias": (dict(bias=False), {}, "bias"),
    "scale": (dict(scale=0.3), {}, "scale"),
    "forced_backend": (dict(backend="math"), {}, "backend"),
    "query_chunks": (dict(query_chunk_size=3), {}, "query_chunk_size"),
    "bias_kv": (dict(add_bias_kv=True), {}, "add_bias_kv"),
    "need_weights": ({}, dict(need_weights=True), "need_weights"),
    "attn_mask_bool": ({}, dict(attn_mask="bool"), "attn_mask"),
    "padding_float": ({}, dict(key_padding_mask="float"), "key_padding_mask"),
    "is_causal": ({}, dict(is_causal=True), "is_causal"),
}


def test_mask_edited_in_place_between_calls_is_seen():
    """The additive mask and the no-key rows are built once per mask object: an in-place edit of the
    mask (its version moves) must rebuild them, not reuse the first call's."""
    theirs, ours = pair()
    x, mask = make_input(), padding()
    with torch.inference_mode():
        first, _ = ours(x, x, x, key_padding_mask=mask, need_weights=False)
    mask[2] = True  # element 2 now has no key
    mask[0] = False
    with torch.inference_mode():
        second, _ = ours(x, x, x, key_padding_mask=mask, need_weights=False)
        want, _ = theirs(x, x, x, key_padding_mask=mask, need_weights=False)
    assert torch.equal(second[2], ours.out_proj.bias.detach().expand(S, E))
    assert torch.equal(second[:2], want[:2]) and not torch.equal(second[0], first[0])


def _call_kwargs(call: dict, dtype) -> dict:
    kwargs = {"need_weights": False} | call
    if kwargs.get("attn_mask") == "bool":
        blocked = torch.rand(S, S, generator=torch.Generator().manual_seed(4)) < 0.3
        blocked[:, 0] = False
        kwargs["attn_mask"] = blocked
    if kwargs.get("key_padding_mask") == "float":
        kwargs["key_padding_mask"] = torch.zeros(B, S, dtype=dtype).masked_fill(padding(), -1e9)
    return kwargs


@pytest.mark.parametrize("case", OUTSIDE)
def test_just_outside_takes_general_path_and_matches_reference(case, monkeypatch):
    overrides, call, reason_words = OUTSIDE[case]
    dtype = torch.float32
    config = {"embed_dim": E, "num_heads": H, "batch_first": True} | overrides
    ours = randomize_(MultiHeadAttention(**config, dtype=torch.float64), seed=1).to(dtype).eval()
    x = make_input(dtype, batch_first=config["batch_first"])
    kwargs = _call_kwargs(call, dtype)
    with torch.inference_mode(), general_path_only(monkeypatch):
        reason = why_not_fast_path(ours, x, x, x, **kwargs)
        out, _ = ours(x, x, x, **kwargs)
    assert reason is not None and reason_words in reason, reason
    x_bf = x if config["batch_first"] else x.transpose(0, 1)
    reference, _ = reference_mha(ours, x_bf, x_bf, x_bf, key_padding_mask=kwargs.get("key_padding_mask"),
                                 attn_mask=kwargs.get("attn_mask"), is_causal=kwargs.get("is_causal", False))  # fmt: skip
    out = out if config["batch_first"] else out.transpose(0, 1)
    torch.testing.assert_close(out, reference.to(dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "padding_bool"])
def test_seq_first_matches_torch(masked):
    """batch_first=False: torch's general path and ours (no fused kernel on either side)."""
    theirs, ours = pair(batch_first=False)
    x = make_input(batch_first=False)
    kwargs = {"key_padding_mask": padding()} if masked else {}
    with torch.inference_mode():
        got, want = ours(x, x, x, need_weights=False, **kwargs)[0], theirs(x, x, x, need_weights=False, **kwargs)[0]
    assert got.shape == (S, B, E)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_mode_cross_attention_and_modes_take_general_path(monkeypatch):
    _, ours = pair()
    x, other = make_input(), make_input(seed=3)
    with torch.inference_mode():
        assert "self-attention" in why_not_fast_path(ours, x, other, other, need_weights=False)
        with PassThrough():  # e.g. attnkit.discover's interceptor must see the SDPA call
            assert "mode" in why_not_fast_path(ours, x, x, x, need_weights=False)
        ours.train()
        assert why_not_fast_path(ours, x, x, x, need_weights=False) == "training mode"
        ours.eval()
    with torch.inference_mode(), general_path_only(monkeypatch), PassThrough():
        ours(x, x, x, need_weights=False)


def test_bad_inputs_raise_attnkit_errors_under_inference_mode():
    _, ours = pair()
    with torch.inference_mode():
        with pytest.raises(InvalidArgumentError, match="query"):
            ours(torch.randn(B, S, E + 1), need_weights=False)
        with pytest.raises(InvalidArgumentError, match="key_padding_mask"):
            x = make_input()
            ours(x, x, x, key_padding_mask=torch.zeros(B, S + 1, dtype=torch.bool), need_weights=False)


def test_from_torch_layer_takes_the_fused_path():
    theirs = randomize_(nn.MultiheadAttention(E, H, batch_first=True), seed=5).eval()
    ours = from_torch(theirs)
    x = make_input()
    with torch.inference_mode():
        assert why_not_fast_path(ours, x, x, x, need_weights=False) is None
        assert torch.equal(ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "padding_bool"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fused_path_equals_torch_on_cuda(dtype, masked):
    theirs, ours = pair(dtype, device="cuda")
    x = make_input(dtype, device="cuda")
    mask = padding("cuda", full_row=True) if masked else None
    with torch.inference_mode():
        assert why_not_fast_path(ours, x, x, x, key_padding_mask=mask, need_weights=False) is None
        got, _ = ours(x, x, x, key_padding_mask=mask, need_weights=False)
        want, _ = theirs(x, x, x, key_padding_mask=mask, need_weights=False)
    rows = slice(0, 2) if masked else slice(None)  # batch element 2 is all padding when masked
    assert torch.equal(got[rows], want[rows])
    if masked:
        assert torch.equal(got[2], ours.out_proj.bias.detach().expand(S, E))


@pytest.mark.parametrize("strict", [False, True], ids=["make_fx", "dynamo"])
def test_export_traces_the_general_path(strict):
    """torch.export sees attnkit's ops, never the fused kernel (as with nn.MultiheadAttention)."""

    class Wrapper(nn.Module):
        def __init__(self, layer: nn.Module):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x, need_weights=False)[0]

    _, ours = pair()
    ours.requires_grad_(False)
    x = make_input()
    assert why_not_fast_path(ours, x, x, x, need_weights=False) is None  # eager would run the kernel
    graph = torch.export.export(Wrapper(ours), (x,), strict=strict).graph
    targets = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    assert not any("native_multi_head_attention" in target for target in targets)
    assert any("linear" in target for target in targets)
