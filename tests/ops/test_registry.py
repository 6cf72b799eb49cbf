"""register_backend: a new backend runs when named, and auto takes it only if it opted in."""

import pytest
import torch

from attnkit.errors import InvalidArgumentError
from attnkit.ops import BACKENDS, AttentionOptions, attention, attention_spec, backend_support, register_backend, select_backend
from attnkit.ops import unregister_backend
from attnkit.ops.reference import explicit_attention


@pytest.fixture
def toy():
    """A toy backend: the math formula, counting its calls; only for float64 calls."""
    calls = []

    def support(spec):
        return None if spec.dtype == torch.float64 else f"toy runs float64 only, got {spec.dtype}"

    def run(q, k, v, options: AttentionOptions):
        calls.append(options)
        return explicit_attention(q, k, v, options)

    yield support, run, calls
    for name in ("toy", "toy_auto"):
        if name in BACKENDS:
            unregister_backend(name)


def _qkv(dtype=torch.float64):
    return [torch.randn(1, 2, 5, 8, dtype=dtype) for _ in range(3)]


def test_auto_ignores_a_backend_that_did_not_opt_in(toy):
    support, run, calls = toy
    register_backend("toy", support, run, summary="toy")
    q, k, v = _qkv()
    # Make it the only candidate that could run: auto still never picks it.
    assert "toy" not in select_backend(attention_spec(q, k, v)).candidates
    attention(q, k, v)
    assert calls == []
    out = attention(q, k, v, causal=True, backend="toy")
    assert len(calls) == 1 and calls[0].causal and calls[0].scale == pytest.approx(8**-0.5)
    torch.testing.assert_close(out, attention(q, k, v, causal=True, backend="reference"))
    assert backend_support(attention_spec(*_qkv(torch.float32)))["toy"] == "toy runs float64 only, got torch.float32"


def test_auto_takes_an_opted_in_backend_where_it_is_the_only_one(toy, monkeypatch):
    support, run, calls = toy
    register_backend("toy_auto", support, run, auto=True)
    q, k, v = _qkv()
    choice = select_backend(attention_spec(q, k, v))
    assert "toy_auto" in choice.candidates and choice.chosen != "toy_auto"  # ranked after the built-ins
    for name in ("math", "chunked", "flash", "flex"):  # now nothing else can run float64 here
        monkeypatch.setitem(BACKENDS, name, BACKENDS[name].__class__(**{**vars(BACKENDS[name]), "support": lambda spec: "off"}))
    from attnkit.ops import clear_caches

    clear_caches()
    try:
        attention(q, k, v)
        assert len(calls) == 1
    finally:
        monkeypatch.undo()
        clear_caches()


def test_register_refuses_clashes_and_non_callables(toy):
    support, run, _ = toy
    with pytest.raises(InvalidArgumentError, match="name"):
        register_backend("math", support, run)
    with pytest.raises(InvalidArgumentError, match="name"):
        register_backend("auto", support, run)
    with pytest.raises(InvalidArgumentError, match="run_fn"):
        register_backend("toy", support, "not callable")
    register_backend("toy", support, run)
    with pytest.raises(InvalidArgumentError, match="replace=True"):
        register_backend("toy", support, run)
    register_backend("toy", support, run, replace=True)
    with pytest.raises(InvalidArgumentError):
        unregister_backend("math")
