"""Structural projection fusion: which siblings are fused, exact outputs and gradients, one GEMM,
state dicts, the shared result's lifetime, torch.compile, random streams, and refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from attnkit.optimize import FusedProjection, FusionGroup, FusionPlan, OptimizeConfig, apply_fusion, optimize, plan_fusion
from attnkit.optimize.compare import float_tensors

transformers = pytest.importorskip("transformers")
T = transformers
_GEMMS = {torch.ops.aten.mm, torch.ops.aten.addmm}


class _CountGemms(TorchDispatchMode):
    """Counts matrix multiplications (mm/addmm: what nn.Linear runs) dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in _GEMMS
        return func(*args, **(kwargs or {}))


def _ids(batch=2, seq=11):
    return torch.randint(0, 97, (batch, seq))


def _hf(name):
    """(model, args, kwargs, expected groups {parent suffix: members}) of a tiny random transformers model."""
    text = dict(vocab_size=97)
    enc_dec = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64)
    gqa = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, **text)
    self_kv_q, cross_kv = ("k_proj", "v_proj", "q_proj"), ("k_proj", "v_proj")
    if name == "bert":
        model = T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, **text))
        return model, (_ids(),), {}, {"attention.self": ("query", "key", "value")}
    if name == "distilbert":
        model = T.DistilBertModel(T.DistilBertConfig(dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_position_embeddings=64, **text))
        return model, (_ids(),), {}, {"attention": ("q_lin", "k_lin", "v_lin")}
    if name in ("llama", "qwen2", "mistral"):
        config = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config, "mistral": T.MistralConfig}[name](**gqa)
        model = {"llama": T.LlamaModel, "qwen2": T.Qwen2Model, "mistral": T.MistralModel}[name](config)
        return model, (_ids(),), {}, {"self_attn": ("q_proj", "k_proj", "v_proj")}  # gate/up: see test_gated_mlp_left_separate
    if name == "bart":
        model = T.BartModel(T.BartConfig(max_position_embeddings=64, **enc_dec, **text))
        return model, (_ids(),), {"decoder_input_ids": _ids(2, 7)}, {"encoder.layers.0.self_attn": self_kv_q, "decoder.layers.0.self_attn": self_kv_q, "encoder_attn": cross_kv}
    if name == "whisper":  # K projections have no bias, Q and V do
        config = T.WhisperConfig(num_mel_bins=8, max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0, **enc_dec, **text)
        expected = {"encoder.layers.0.self_attn": self_kv_q, "decoder.layers.0.self_attn": self_kv_q, "encoder_attn": cross_kv}
        return T.WhisperModel(config), (torch.randn(2, 8, 32),), {"decoder_input_ids": _ids(2, 5)}, expected
    if name == "t5":
        model = T.T5Model(T.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0, **text))
        expected = {"encoder.block.0.layer.0.SelfAttention": ("q", "k", "v"), "decoder.block.0.layer.0.SelfAttention": ("q", "k", "v"), "EncDecAttention": ("k", "v")}
        return model, (_ids(),), {"decoder_input_ids": _ids(2, 7)}, expected
    if name == "clip":
        model = T.CLIPTextModel(T.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64, **text))
        return model, (_ids(),), {}, {"self_attn": self_kv_q}
    raise AssertionError(name)


def _double(model, args):
    """fp64 copies of the model (eval) and of the floating inputs."""
    return copy.deepcopy(model).double().eval(), tuple(a.double() if a.is_floating_point() else a for a in args)


@pytest.mark.parametrize("name", ["bert", "distilbert", "llama", "qwen2", "mistral", "bart", "whisper", "t5", "clip"])
def test_groups_outputs_and_one_gemm(name):
    """fp64: fused outputs equal the original's to 1e-12 relative; each group saves members-1 GEMMs."""
    torch.manual_seed(0)
    model, args, kwargs, expected = _hf(name)
    model, args = _double(model, args)
    plan = plan_fusion(model, args, kwargs)
    found = {g.parent: g.members for g in plan.groups}
    assert len(found) == len(expected) and all(r.parent.endswith("mlp") for r in plan.refused), plan.describe()
    for suffix, members in expected.items():  # cross attention: only K/V (Q reads the decoder states)
        assert [m for p, m in found.items() if p.endswith(suffix)] == [members] * sum(p.endswith(suffix) for p in found), (suffix, found)
    fused = apply_fusion(copy.deepcopy(model), plan)
    with torch.no_grad(), _CountGemms() as before:
        reference = float_tensors(model(*args, **kwargs))
    with torch.no_grad(), _CountGemms() as after:
        got = float_tensors(fused(*args, **kwargs))
    assert before.count - after.count == sum(len(g.members) - 1 for g in plan.groups)
    for a, b in zip(got, reference, strict=True):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()


def test_gradients_and_training_step_match():
    """fp64, train mode without dropout: parameter gradients (under original names) and one SGD step match."""
    torch.manual_seed(0)
    model, args, kwargs, _ = _hf("whisper")  # mixed bias in the group
    model, args = _double(model, args)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    fused = apply_fusion(copy.deepcopy(model), plan_fusion(model, args, kwargs))
    for m in (model, fused):
        m.train()
        out = float_tensors(m(*args, **kwargs))[0]
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    state, ref = fused.state_dict(), model.state_dict()
    assert state.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(state[key], ref[key], rtol=1e-12, atol=1e-12, msg=key)
    with torch.no_grad():  # and the weights after the step give the same outputs (no stale shared result)
        for a, b in zip(float_tensors(fused.eval()(*args, **kwargs)), float_tensors(model.eval()(*args, **kwargs))):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_state_dict_keys_order_and_checkpoints():
    torch.manual_seed(0)
    model, args, kwargs, _ = _hf("llama")
    plan = plan_fusion(model, args, kwargs)
    fused = apply_fusion(copy.deepcopy(model), plan)
    original = model.state_dict()
    assert list(fused.state_dict()) == list(original)  # same keys, same order
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in original.items())
    torch.manual_seed(1)
    other, _, _, _ = _hf("llama")
    target = apply_fusion(other, plan)
    assert not torch.equal(target.state_dict()["layers.0.self_attn.k_proj.weight"], original["layers.0.self_attn.k_proj.weight"])
    target.load_state_dict(original)  # the original's checkpoint loads strictly into a fused model
    assert all(torch.equal(target.state_dict()[k], v) for k, v in original.items())
    plain, _, _, _ = _hf("llama")
    plain.load_state_dict(fused.state_dict())  # and a fused model's into the original architecture
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in original.items())
    torch.manual_seed(2)
    target = apply_fusion(_hf("llama")[0], plan)  # fresh weights again, for a partial load
    partial = {k: v for k, v in original.items() if k != "layers.0.self_attn.v_proj.weight"}
    result = target.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["layers.0.self_attn.v_proj.weight"]
    loaded = target.state_dict()
    assert torch.equal(loaded["layers.0.self_attn.k_proj.weight"], original["layers.0.self_attn.k_proj.weight"])  # the present ones load


class _Attention(nn.Module):
    """Hand-written: q/k/v of ``x``; ``other`` projects ``y`` (a different tensor)."""

    def __init__(self, dim=16):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, 8, bias=False), nn.Linear(dim, 8)
        self.other = nn.Linear(dim, dim)

    def forward(self, x, y):
        q, k, v = self.q(x), self.k(x), self.v(x)
        return torch.softmax(q[..., :8] @ k.transpose(-1, -2), -1) @ v + self.other(y)[..., :8]


class _Clone(nn.Module):
    """Two projections of equal values in different tensors (must not be grouped)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.a(x) + self.b(x.clone())


def test_hand_written_groups_only_what_reads_the_same_tensor():
    model = _Attention()
    x, y = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    plan = plan_fusion(model, (x, y))
    assert [g.members for g in plan.groups] == [("q", "k", "v")]
    assert plan_fusion(_Clone(), (torch.randn(3, 8),)).groups == ()  # same values, different tensors
    plan = plan_fusion(model, (x, x))  # now `other` reads x too: grouped with them
    assert [g.members for g in plan.groups] == [("q", "k", "v", "other")]


def test_planted_fault_forced_group_of_different_inputs_stays_correct():
    """A plan that (wrongly) groups Linears reading different tensors: each computes its own result."""
    torch.manual_seed(0)
    model = _Attention().double()
    x, y = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    forced = apply_fusion(copy.deepcopy(model), FusionPlan((FusionGroup("", ("q", "k", "v", "other")),)))
    torch.testing.assert_close(forced(x, y), model(x, y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(forced(y, x), model(y, x), rtol=1e-12, atol=1e-12)


class _Tricky(nn.Module):
    """Siblings called with the same tensor but the input or the weights change in between, twice, or under other grad modes."""

    def __init__(self, case):
        super().__init__()
        self.case = case
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = x * 1.0
        a = self.a(x)
        if self.case == "input-in-place":
            x.add_(1.0)
        elif self.case == "weight-in-place":
            with torch.no_grad():
                self.b.weight.mul_(2.0)  # through the member's view: the fused weight changes
        elif self.case == "twice":
            a = a + self.a(x)
        elif self.case == "no-grad":
            with torch.no_grad():
                return a.sum() + self.b(x).sum()
        return a.sum() + self.b(x).sum()


@pytest.mark.parametrize("case", ["input-in-place", "weight-in-place", "twice", "no-grad"])
def test_shared_result_never_stale(case):
    torch.manual_seed(0)
    model = _Tricky("plain").double()
    x = torch.randn(3, 8, dtype=torch.float64)
    fused = apply_fusion(copy.deepcopy(model), FusionPlan((FusionGroup("", ("a", "b")),)))
    model.case = fused.case = case
    torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.b.weight, model.b.weight)


def test_nothing_outlives_a_forward_and_copies_work():
    torch.manual_seed(0)
    model, args, kwargs, _ = _hf("llama")
    fused = apply_fusion(copy.deepcopy(model), plan_fusion(model, args, kwargs))
    apply_fusion(fused, FusionPlan())  # applying again keeps one lifetime hook
    groups = [m for m in fused.modules() if type(m).__name__ == "FusedLinear"]
    # One forward hook, on the fused model: the parents stay on nn.Module's hook-free fast path.
    assert len(fused._forward_hooks) == 1 and not fused._forward_pre_hooks
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in fused.modules() if m is not fused)
    fused.train()
    out = fused(*args, **kwargs).last_hidden_state
    assert all(g._pending is None and g._traced is None for g in groups)
    # A member called alone (outside the model's forward): its siblings' slices wait for the next forward.
    attention = fused.layers[0].self_attn
    hidden = torch.randn(2, 11, 32)
    attention.q_proj(hidden)
    assert groups[0]._pending is not None
    twin = copy.deepcopy(fused)  # slices carrying autograd history are not copied
    twin_groups = [m for m in twin.modules() if type(m).__name__ == "FusedLinear"]
    twin.layers[0].self_attn.k_proj(hidden)
    twin(*args, **kwargs)  # the copy's hook resets the copy's groups, not the original's
    assert twin_groups[0]._pending is None and groups[0]._pending is not None
    # A forward that leaves a member uncalled (here: it raises after q_proj) still drops the slices.
    original = type(attention).forward
    type(attention).forward = lambda self, hidden_states, *a, **k: (self.q_proj(hidden_states), 1 / 0)
    try:
        with pytest.raises(ZeroDivisionError):
            fused(*args, **kwargs)
    finally:
        type(attention).forward = original
    assert groups[0]._pending is None
    out2 = fused(*args, **kwargs).last_hidden_state
    assert groups[0]._pending is None
    torch.testing.assert_close(out2, out)
    (out + out2).sum().backward()  # two forwards, two independent graphs
    torch.testing.assert_close(attention.k_proj(hidden), nn.functional.linear(hidden, model.layers[0].self_attn.k_proj.weight))


def test_members_look_like_linears():
    model = _Attention()
    fused = apply_fusion(copy.deepcopy(model), plan_fusion(model, (torch.randn(2, 3, 16), torch.randn(2, 3, 16))))
    k = fused.k
    assert isinstance(k, FusedProjection) and (k.in_features, k.out_features) == (16, 8) and k.bias is None
    assert torch.equal(k.weight, model.k.weight) and torch.equal(fused.v.bias, model.v.bias)
    assert "fused in fused_q_k_v" in repr(fused)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())


class _Refusals(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.hooked, self.plain, self.plain2 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.hooked.register_forward_hook(lambda m, i, o: o * 2)
        self.tied, self.untied = nn.Linear(8, 8), nn.Linear(8, 8)
        self.elsewhere = nn.Linear(8, 8)
        self.elsewhere.weight = self.tied.weight
        self.frozen, self.trained = nn.Linear(8, 8), nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        n, m = -x, x * 3
        heads = sum(h(x) for h in self.heads)
        plain = (self.plain(x).view(-1, 2, 4) @ self.plain2(x).view(-1, 4, 2)).flatten(1)
        return heads + self.hooked(x) + torch.cat([plain, plain], -1) + self.tied(n) + self.untied(n) + self.elsewhere(x * 2) + self.frozen(m) + self.trained(m)


def test_refusals_are_listed_with_reasons():
    model = _Refusals()
    plan = plan_fusion(model, (torch.randn(2, 8),))
    reasons = {(r.parent, r.members): r.reason for r in plan.refused}
    assert "ModuleList" in reasons[("heads", ("0", "1"))]
    assert "hooks" in reasons[("", ("hooked",))] and "shared" in reasons[("", ("tied",))]
    assert "frozen" in reasons[("", ("frozen", "trained"))]
    assert [g.members for g in plan.groups] == [("plain", "plain2")]  # the fit ones of the hooked group
    y = torch.randn(2, 8)
    torch.testing.assert_close(apply_fusion(copy.deepcopy(model), plan)(y), model(y))


class _Gated(nn.Module):
    """Two projections of x read by ``readers``: elementwise only (a gated MLP), or split into heads first."""

    def __init__(self, readers):
        super().__init__()
        self.readers = readers
        self.gate, self.up = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        gate, up = self.gate(x), self.up(x)
        if self.readers == "heads":  # one member split into heads is enough (Whisper scales q, views k and v)
            return (gate * 0.5) @ up.view(-1, 2, 4).transpose(-1, -2).flatten(1).T
        return nn.functional.silu(gate) * up


def test_gated_mlp_left_separate():
    """Outputs that feed only elementwise ops are left separate, with the ops named; head splits are fused."""
    model, args, kwargs, _ = _hf("llama")
    reasons = {r.parent: (r.members, r.reason) for r in plan_fusion(model, args, kwargs).refused}
    assert reasons["layers.0.mlp"][0] == ("gate_proj", "up_proj") and "elementwise ops (mul, silu)" in reasons["layers.0.mlp"][1]
    x = torch.randn(4, 8)
    pointwise = plan_fusion(_Gated("pointwise"), (x,))
    assert pointwise.groups == () and "elementwise ops (mul, silu)" in pointwise.refused[0].reason
    heads = _Gated("heads")
    plan = plan_fusion(heads, (x,))
    assert [g.members for g in plan.groups] == [("gate", "up")] and not plan.refused
    torch.testing.assert_close(apply_fusion(copy.deepcopy(heads), plan)(x), heads(x))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compile_one_graph_one_gemm_per_group(mode):
    """fullgraph=True traces the fused model; its forward graph has one GEMM per group."""
    from torch._dynamo.backends.common import aot_autograd

    torch.manual_seed(0)
    model, args, kwargs, _ = _hf("llama")
    plan = plan_fusion(model, args, kwargs)
    fused = apply_fusion(copy.deepcopy(model), plan).train(mode == "train")
    graphs = []

    def capture(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(fused, backend=aot_autograd(fw_compiler=capture), fullgraph=True)
    with torch.set_grad_enabled(mode == "train"):
        out = compiled(*args, **kwargs).last_hidden_state
    gemms = [n for g in graphs[:1] for n in g.graph.nodes if n.op == "call_function" and getattr(n.target, "overloadpacket", None) in _GEMMS]
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert len(gemms) == linears - sum(len(g.members) - 1 for g in plan.groups)
    torch.testing.assert_close(out, model.train(mode == "train")(*args, **kwargs).last_hidden_state, rtol=1e-5, atol=1e-6)
    assert all(m._traced is None for m in fused.modules() if hasattr(m, "_traced"))


def test_compiled_block_keeps_no_shared_result():
    """A block compiled on its own (as torchtitan compiles per layer) ends its graph inside the model's forward:
    the last member drops the traced GEMM, so nothing stays referenced after the block returns."""
    torch.manual_seed(0)
    model, args, kwargs, _ = _hf("llama")
    fused = apply_fusion(copy.deepcopy(model), plan_fusion(model, args, kwargs)).eval()
    layer = fused.layers[0]
    groups = [m for m in layer.modules() if type(m).__name__ == "FusedLinear"]
    torch._dynamo.reset()
    layer.compile(backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out = fused(*args, **kwargs).last_hidden_state
        hidden = fused.embed_tokens(args[0])
        position = fused.rotary_emb(hidden, torch.arange(args[0].shape[1])[None])
        layer(hidden, position_embeddings=position)  # the block alone: no model-level reset after it
    assert groups and all(g._traced is None and g._pending is None for g in groups)
    torch.testing.assert_close(out, model.eval()(*args, **kwargs).last_hidden_state, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


class _DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep = (torch.rand(x.shape[0], 1, 1) >= self.p).to(x.dtype)
        return x * keep / (1 - self.p)


class _Block(nn.Module):
    """Stochastic depth around hand-written attention, dropout on the probabilities."""

    def __init__(self):
        super().__init__()
        self.attn, self.drop, self.path = _Attention(), nn.Dropout(0.2), _DropPath(0.5)

    def forward(self, x):
        return x[..., :8] + self.path(self.drop(self.attn(x, x)))


def test_random_streams_untouched():
    """Train mode, same seed: identical outputs and the same generator state afterwards (fusion draws nothing)."""
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), nn.Linear(8, 16), _Block()).double().train()
    x = torch.randn(6, 5, 16, dtype=torch.float64)
    fused = apply_fusion(copy.deepcopy(model), plan_fusion(model, (x,)))
    assert len(plan_fusion(model, (x,)).groups) == 2
    results = []
    for m in (model, fused):
        torch.manual_seed(1)
        results.append((m(x), torch.get_rng_state()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-12)
    assert torch.equal(results[1][1], results[0][1])
    torch.manual_seed(2)
    assert not torch.allclose(model(x), results[0][0])  # the output does depend on the draws


def test_optimize_fuses_and_reports():
    torch.manual_seed(0)
    model, args, kwargs, _ = _hf("distilbert")
    optimized, report = optimize(model.eval(), args, example_kwargs=kwargs, config=OptimizeConfig(measure=False))
    assert report.passed and [g.members for g in report.fusion.groups] == [("q_lin", "k_lin", "v_lin")]
    assert isinstance(optimized.transformer.layer[0].attention.q_lin, FusedProjection)
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(report)
    assert "q_lin (32) + k_lin (32) + v_lin (32)" in console.export_text()
    _, off = optimize(model, args, example_kwargs=kwargs, fuse_qkv=False, config=OptimizeConfig(check=False, measure=False))
    assert off.fusion is None
    _, no_inputs = optimize(model, config=OptimizeConfig(check=False, measure=False))
    assert no_inputs.fusion is None and any("not fused" in n for n in no_inputs.notes)


def test_gradient_checkpointing_and_inference_mode():
    """fp64: recomputation in backward re-runs the parents (fresh shared results); gradients equal to 1e-12."""
    from attnkit.optimize.equivalence import _gradients_by_state_key

    torch.manual_seed(0)
    model, args, kwargs, _ = _hf("llama")
    model, args = _double(model, args)
    fused = apply_fusion(copy.deepcopy(model), plan_fusion(model, args, kwargs))
    for m in (model, fused):
        m.gradient_checkpointing_enable()
        m.train()
        m(*args, use_cache=False).last_hidden_state.square().sum().backward()
    expected = {name: p.grad for name, p in model.named_parameters()}
    got = _gradients_by_state_key(fused, set(expected))
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-12, atol=1e-12, msg=name)
    with torch.inference_mode():
        torch.testing.assert_close(fused.eval()(*args).last_hidden_state, model.eval()(*args).last_hidden_state, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad], ids=["inference_mode", "no_grad"])
def test_optimize_inside_inference_mode_keeps_a_trainable_model(mode):
    """Called inside ``torch.inference_mode()`` (or ``no_grad``), optimize still proves gradients and builds
    normal parameters: before the fix its fused weights were inference tensors, whose missing version counter
    crashed the first forward, and which no training step could use. A cast inside inference mode (weights
    without a version counter) still runs."""
    torch.manual_seed(0)
    model = _hf("bert")[0].eval()
    with mode():
        ids = _ids()  # an inference tensor under inference_mode
        fast, report = optimize(model, (ids,), config=OptimizeConfig(measure=False))
        assert report.kept and report.passed and any(c.what == "gradients" for c in report.checks), report.dumps()
        assert report.fusion.groups
        torch.testing.assert_close(fast(ids).last_hidden_state, model(ids).last_hidden_state, rtol=1e-5, atol=1e-6)
        doubled = copy.deepcopy(fast).to(torch.float64)  # weights replaced inside the mode
        torch.testing.assert_close(doubled(ids).last_hidden_state, model.double()(ids).last_hidden_state, rtol=1e-10, atol=1e-12)
        model.float()
    assert not any(p.is_inference() for p in fast.parameters())
    fast.train()
    fast(_ids()).last_hidden_state.sum().backward()
    groups = [m for m in fast.modules() if type(m).__name__ == "FusedLinear"]
    assert groups and all(g.weight.grad is not None and g.weight.grad.abs().sum() > 0 for g in groups)
