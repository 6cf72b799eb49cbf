"""`optimize` on models that do something unusual with their projections or their random streams.

Found by running models nobody tuned for: Longformer divides its query projection's output in place
(`query /= sqrt(d)`), Wav2Vec2 draws its SpecAugment masks from NumPy's global random stream. The
proof must neither crash nor reject a correct rewrite, and a rewrite that cannot run is never kept.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from torch import nn

import attnkit.optimize.fuse as fuse
from attnkit.optimize import OptimizeConfig, hf_interface, optimize


class InPlaceQuery(nn.Module):
    """Self-attention whose query projection's output is written in place: scaled (as Longformer does), through a view, or item-assigned."""

    def __init__(self, write: str, width: int = 16):
        super().__init__()
        self.write = write
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        q = self.query(x)
        if self.write == "div_":
            q /= 4.0
        elif self.write == "mul_":  # into a view of the output
            q.unflatten(-1, (2, -1)).mul_(0.25)
        else:
            q[..., :2] = 0.0
        weights = torch.softmax(q @ self.key(x).transpose(-1, -2), dim=-1)
        return weights @ self.value(x)


class NumpyMasked(nn.Module):
    """Attention over inputs masked in training by NumPy's global random stream (SpecAugment's way)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        if self.training:
            keep = torch.from_numpy(np.random.rand(*x.shape[:-1]) > 0.3).to(x.dtype)
            x = x * keep[..., None]
        weights = torch.softmax(self.query(x) @ self.key(x).transpose(-1, -2) / 4.0, dim=-1)
        return weights @ self.value(x)


pytestmark = pytest.mark.usefixtures("one_thread")


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("write", ["div_", "mul_", "__setitem__"])
@pytest.mark.parametrize("preset", ["default", "rewrite-only"])
def test_a_projection_modified_in_place_stays_out_of_the_fused_group(preset, write):
    torch.manual_seed(0)
    model, x = InPlaceQuery(write), _x(2, 5, 16)
    config = OptimizeConfig(measure=False) if preset == "default" else OptimizeConfig.from_preset("rewrite-only")
    optimized, report = optimize(model, (x,), config=config)
    assert report.passed and report.kept
    assert [group.members for group in report.fusion.groups] == [("key", "value")]
    (refusal,) = [r for r in report.fusion.refused if r.members == ("query",)]
    assert f"modified in place ({write})" in refusal.reason
    out = optimized(x)  # with autograd on: a fused query would raise here
    out.square().sum().backward()
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    assert optimized.fused_key_value.weight.grad is not None


def test_an_optimized_model_that_raises_is_rejected_with_the_error(monkeypatch):
    """A planted fault: the fused GEMM raises. The proof reports it and returns the original."""

    def broken(self, x):
        raise RuntimeError("planted: the fused GEMM cannot run")

    monkeypatch.setattr(fuse.FusedLinear, "forward", broken)
    torch.manual_seed(0)
    model, x = NumpyMasked().eval(), _x(2, 5, 16)
    returned, report = optimize(model, (x,), config=OptimizeConfig(measure=False))
    assert not report.kept and not report.passed
    assert returned is model and not any(isinstance(m, fuse.FusedLinear) for m in returned.modules())
    failed = [check for check in report.checks if not check.passed]
    assert failed and "raised RuntimeError: planted: the fused GEMM cannot run" in failed[0].rule
    torch.testing.assert_close(returned(x), model(x))


@pytest.mark.parametrize("seed", [0, 2**40, -3])  # any int torch takes; NumPy's own range is 0..2**32-1
def test_numpy_random_streams_are_seeded_identically_for_both_models(seed):
    torch.manual_seed(0)
    model, x = NumpyMasked(), _x(2, 6, 16)
    state = np.random.get_state()
    _, report = optimize(model, (x,), config=OptimizeConfig(measure=False, seed=seed))
    assert report.kept and report.passed, [c for c in report.checks if not c.passed]
    assert {c.mode for c in report.checks} >= {"eval", "train"}
    assert report.fusion.groups, "the Q/K/V projections are fused, so the train check compares two different models"
    after = np.random.get_state()
    assert after[0] == state[0] and (after[1] == state[1]).all() and after[2:] == state[2:]  # the user's stream is untouched


def test_wav2vec2_with_spec_augment_is_rewritten_and_kept():
    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
        conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=32, mask_time_prob=0.05,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(config).eval()
    _, report = optimize(model, (_x(1, 1600),), config=OptimizeConfig(measure=False))
    assert report.kept and report.passed, [c for c in report.checks if not c.passed]
    assert len(report.rewrites) == 2


def test_longformer_keeps_its_in_place_query_out_of_the_fusion():
    config = transformers.LongformerConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, attention_window=4,
        max_position_embeddings=130, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LongformerModel(config).eval()
    ids = torch.randint(3, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    optimized, report = optimize(model, (ids,), config=OptimizeConfig(measure=False))
    assert report.passed and report.fusion.groups
    assert all("query" not in group.members for group in report.fusion.groups)
    optimized.train()
    optimized(ids).last_hidden_state.sum().backward()


def test_a_model_with_nothing_to_rewrite_says_its_checks_prove_nothing():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    _, report = optimize(model, (_x(2, 16),), config=OptimizeConfig(measure=False))
    assert report.rewritten == 0 and not report.fusion.groups
    assert any(note.startswith("nothing was rewritten or fused") and "compare it with itself" in note for note in report.notes)


def test_gpt_bigcode_float_attention_dropout_is_off_in_the_deterministic_checks():
    """GPTBigCode keeps its attention dropout as a float named ``attn_dropout`` (0.1 by default)."""
    config = transformers.GPTBigCodeConfig(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, multi_query=True)
    torch.manual_seed(0)
    model = transformers.GPTBigCodeForCausalLM(config).eval()
    ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    _, report = optimize(model, (ids,), config=OptimizeConfig(measure=False))
    assert report.kept and report.passed, [c for c in report.checks if not c.passed]
    assert len(report.rewrites) == 2


def _gpt2_upcast_eager():
    """GPT-2 whose eager path (``reorder_and_upcast_attn``) applies attention dropout by calling its ``nn.Dropout``;
    on attnkit the same probability goes into the attention call."""
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, reorder_and_upcast_attn=True,
                                     scale_attn_by_inverse_layer_idx=True, attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval(), torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(0))


def test_attention_dropout_applied_by_hand_in_the_original_is_kept_on():
    model, ids = _gpt2_upcast_eager()
    _, report = optimize(model, (ids,), config=OptimizeConfig(measure=False))
    assert report.kept and report.passed, [c for c in report.checks if not c.passed]
    assert [c.what for c in report.checks].count("dropout") == 1


def test_attention_dropout_dropped_by_the_rewrite_is_still_caught_when_the_original_applies_it_by_hand(monkeypatch):
    real = hf_interface.attention
    monkeypatch.setattr(hf_interface, "attention", lambda q, k, v, **options: real(q, k, v, **{**options, "dropout_p": 0.0}))
    model, ids = _gpt2_upcast_eager()
    returned, report = optimize(model, (ids,), config=OptimizeConfig(measure=False))
    assert [(c.what, c.passed) for c in report.checks if c.what == "dropout"] == [("dropout", False)]
    assert not report.kept and returned is model


@pytest.mark.parametrize("who_raises", ["both", "optimized"])
def test_a_check_the_original_cannot_run_is_noted_not_failed(monkeypatch, who_raises):
    """Planted: the cached-decoding check raises (MusicGen's composite config makes transformers' cache raise
    for the original too). Raising for the original as well is a note; for the rewrite alone, a failure."""
    import attnkit.optimize.equivalence as equivalence

    def decoding_checks(original, optimized, *args, **kwargs):
        if who_raises == "both" or optimized is not original:
            raise ValueError("planted: no cache for this config")
        return [], []

    monkeypatch.setattr(equivalence, "decoding_checks", decoding_checks)
    torch.manual_seed(0)
    model, x = NumpyMasked().eval(), _x(2, 5, 16)
    _, report = optimize(model, (x,), config=OptimizeConfig(measure=False))
    noted = any(n.startswith("cached decoding not checked: the original raised ValueError: planted") for n in report.notes)
    failed = [c for c in report.checks if not c.passed]
    if who_raises == "both":
        assert noted and not failed and report.kept
    else:
        assert not noted and not report.kept and failed[0].what == "cached decoding" and "planted" in failed[0].rule


class FusedViewBreaks(nn.Module):
    """Projections, one of whose outputs is merged with its rows by ``view`` (after ``unflatten``: the
    stand-in must follow the chain), which a column slice of a fused GEMM cannot give; then nn.MultiheadAttention."""

    def __init__(self, width: int = 16, merge: bool = True):
        super().__init__()
        self.merge = merge
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.mha = nn.MultiheadAttention(width, 2, batch_first=True)

    def forward(self, x):
        q = self.query(x)
        if self.merge:
            q = q.unflatten(-1, (2, -1)).view(x.shape[0], -1).view_as(x)
        mixed = torch.softmax(q @ self.key(x).transpose(-1, -2) / 4.0, dim=-1) @ self.value(x)
        return self.mha(mixed, mixed, mixed, need_weights=False)[0]


def test_a_projection_viewed_in_a_layout_a_fused_slice_cannot_give_stays_out_of_the_fusion():
    """SpeechT5's postnet views ``feat_out(h)`` as ``(B, -1, mel_bins)``: planned out of the fusion, not failed in the proof."""
    torch.manual_seed(0)
    model, x = FusedViewBreaks().eval(), _x(2, 5, 16)
    plan = fuse.plan_fusion(model, (x,))
    assert [g.members for g in plan.groups] == [("key", "value")]
    assert [r.members for r in plan.refused] == [("query",)] and "view() of its output needs a layout a column slice of a fused output does not have" in plan.refused[0].reason
    optimized, report = optimize(model, (x,), config=OptimizeConfig(measure=False))
    assert report.kept and report.passed and len(report.rewrites) == 1 and not report.notes
    torch.testing.assert_close(optimized(x), model(x), rtol=1e-5, atol=1e-6)


class StridedRead(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):  # reads a's output through its own (contiguous) strides: on a fused slice, b's columns
        return self.a(x).as_strided((x.shape[0], 4), (x.shape[-1], 1)) @ self.b(x)[:, :4].T


def test_as_strided_on_a_projection_output_keeps_it_out_of_the_fusion():
    plan = fuse.plan_fusion(StridedRead(), (_x(3, 8),))
    assert not plan.groups and "as_strided" in plan.refused[0].reason


def test_a_fusion_that_fails_the_proof_is_dropped_and_the_other_rewrites_kept(monkeypatch):
    """A planted fault the plan cannot foresee: the fused GEMM raises. The proof fails, and optimize proves and keeps
    the nn.MultiheadAttention rewrite without the fusion."""

    def broken(self, x):
        raise RuntimeError("planted: the fused GEMM cannot run")

    monkeypatch.setattr(fuse.FusedLinear, "forward", broken)
    torch.manual_seed(0)
    model, x = FusedViewBreaks(merge=False).eval(), _x(2, 5, 16)
    optimized, report = optimize(model, (x,), config=OptimizeConfig(measure=False))
    assert report.kept and report.passed and len(report.rewrites) == 1  # the nn.MultiheadAttention
    assert report.notes[0].startswith("with its projections fused the rewrite failed the proof") and "kept without the fusion" in report.notes[0]
    assert not any(isinstance(m, fuse.FusedLinear) for m in optimized.modules())
    torch.testing.assert_close(optimized(x), model(x), rtol=1e-5, atol=1e-6)
