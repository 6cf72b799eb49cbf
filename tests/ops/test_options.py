"""AttentionOptions, positions for sharded sequences, BlockMask masks, the per-mask cache and one clear."""

import pytest
import torch

from attnkit.errors import InvalidArgumentError
from attnkit.ops import AttentionOptions, attention, clear_caches
from attnkit.ops import masks as masks_module
from attnkit.ops.cache import _PER_MASK

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CPU_BACKENDS = ["reference", "math", "flash", "chunked", "flex"]


def _qkv(b=2, hq=4, hkv=2, sq=12, skv=12, d=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype) for s in ((b, hq, sq, d), (b, hkv, skv, d), (b, hkv, skv, d))]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_options_object_equals_the_keywords(backend):
    q, k, v = _qkv(dtype=torch.float32)
    mask = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1)) > 0.3
    options = AttentionOptions(mask=mask, causal=True, scale=0.2, return_lse=backend in ("reference", "math", "chunked", "flex"))
    by_options = attention(q, k, v, options=options, backend=backend)
    by_keywords = attention(q, k, v, mask=mask, causal=True, scale=0.2, return_lse=options.return_lse, backend=backend)
    for a, b in zip(by_options if options.return_lse else [by_options], by_keywords if options.return_lse else [by_keywords]):
        assert torch.equal(a, b)


def test_options_and_keywords_together_are_refused():
    q, k, v = _qkv()
    with pytest.raises(InvalidArgumentError, match="options"):
        attention(q, k, v, options=AttentionOptions(causal=True), causal=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("q_rows", "kv_cols"), [((8, 16), (0, 16)), ((4, 10), (2, 12)), ((0, 6), (6, 16))])
def test_a_shard_with_positions_is_the_slice_of_full_causal_attention(backend, q_rows, kv_cols):
    """Query global q_start + i sees key kv_start + j iff kv_start + j <= q_start + i."""
    q, k, v = _qkv(sq=16, skv=16, dtype=torch.float32 if backend != "reference" else torch.float64)
    (q0, q1), (k0, k1) = q_rows, kv_cols
    shard = attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], causal=True, q_start=q0, kv_start=k0, backend=backend)
    # The truth: the full causal problem, restricted to the shard's keys by a bool mask.
    keys = torch.zeros(16, dtype=torch.bool)
    keys[k0:k1] = True
    full = attention(q.double(), k.double(), v.double(), mask=keys.expand(16, 16), causal=True, backend="reference")[:, :, q0:q1]
    torch.testing.assert_close(shard.double(), full, atol=2e-6, rtol=2e-6)
    if q_rows == (0, 6):  # every query is before every key: empty rows, zeros
        assert torch.equal(shard, torch.zeros_like(shard))


def test_default_positions_keep_bottom_right():
    q, k, v = _qkv(sq=3, skv=9)
    torch.testing.assert_close(attention(q, k, v, causal=True), attention(q, k, v, causal=True, q_start=6, kv_start=0))
    assert not torch.allclose(attention(q, k, v, causal=True), attention(q, k, v, causal=True, q_start=0, kv_start=0))


def _block_mask(b, h, sq, skv, window=5):
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return create_block_mask(sliding, b, h, sq, skv, device="cpu", BLOCK_SIZE=4), sliding


@pytest.mark.parametrize("backend", ["reference", "math", "chunked", "flex"])
def test_block_mask_equals_its_dense_mask(backend):
    q, k, v = _qkv(sq=12, skv=12, dtype=torch.float32)
    block_mask, _ = _block_mask(None, None, 12, 12)
    dense = (torch.arange(12) <= torch.arange(12).unsqueeze(-1)) & (torch.arange(12).unsqueeze(-1) - torch.arange(12) < 5)
    got = attention(q, k, v, mask=block_mask, backend=backend)
    want = attention(q.double(), k.double(), v.double(), mask=dense, backend="reference")
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-6)


def test_a_sparse_pattern_object_gives_its_block_mask_once():
    calls = []

    class Window:
        def block_mask(self, batch, heads, seq_q, seq_kv, device):
            calls.append((batch, heads, seq_q, seq_kv))
            return _block_mask(None, None, seq_q, seq_kv)[0]

    q, k, v = _qkv(sq=12, skv=12, dtype=torch.float32)
    pattern = Window()
    first = attention(q, k, v, mask=pattern, backend="math")
    second = attention(q, k, v, mask=pattern, backend="math")
    assert torch.equal(first, second) and calls == [(2, 4, 12, 12)]
    with pytest.raises(InvalidArgumentError, match="causal"):
        attention(q, k, v, mask=pattern, causal=True)


def test_per_mask_work_is_done_once_per_mask_object(monkeypatch):
    built = []
    merged_mask = masks_module.merged_mask
    monkeypatch.setattr(masks_module, "merged_mask", lambda *a, **kw: built.append(1) or merged_mask(*a, **kw))
    clear_caches()
    q, k, v = _qkv(dtype=torch.float32)
    mask = torch.rand(2, 1, 12, 12) > 0.3
    outs = [attention(q, k, v, mask=mask, causal=True, backend="math") for _ in range(4)]  # 4 "layers"
    assert len(built) == 1 and all(torch.equal(out, outs[0]) for out in outs)
    mask[..., 0] = ~mask[..., 0]  # an in-place change is seen: built again
    changed = attention(q, k, v, mask=mask, causal=True, backend="math")
    assert len(built) == 2
    torch.testing.assert_close(changed, attention(q, k, v, mask=mask.clone(), causal=True, backend="reference"))
    clear_caches()
    assert len(_PER_MASK) == 0


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_nan_in_q_gives_nan_like_the_math_path(backend):
    q, k, v = _qkv(dtype=torch.float32)
    q[0, 1, 3, 5] = float("nan")
    out = attention(q, k, v, backend=backend)
    assert torch.isnan(out[0, 1, 3]).all()
    assert not torch.isnan(out[0, 1, 4]).any() and not torch.isnan(out[1]).any()


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_empty_batch_returns_an_empty_output(backend):
    q, k, v = (t[:0].float().requires_grad_() for t in _qkv())
    with torch.set_grad_enabled(backend != "flex"):  # flex has no backward on CPU
        out = attention(q, k, v, causal=True, backend=backend)
    assert out.shape == (0, 4, 12, 16)
    if out.requires_grad:
        out.sum().backward()
        assert q.grad.shape == q.shape
