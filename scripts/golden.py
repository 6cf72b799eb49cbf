"""Regenerate, or check, the MultiHeadAttention golden fixtures in ``tests/golden/``.

Each case stores random parameters and inputs from a fixed seed and the float64 outputs of the
``reference`` backend, in one small safetensors file; ``manifest.json`` records the config, seed,
shapes, how the sequence is fed (whole, or chunks through a KVCache) and the tolerances.

    python scripts/golden.py           # rewrite the fixtures
    python scripts/golden.py --check   # exit 1 with a readable diff if the stored files differ

``--check`` compares parameters, inputs and masks bit for bit and expected outputs within
``REGENERATION_ATOL`` (float64 sums may round differently on another BLAS build).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from attnkit.nn import KVCache, MultiHeadAttention

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "tests" / "golden"
MANIFEST = GOLDEN_DIR / "manifest.json"
TOLERANCE = {"float64": 1e-6, "float32": 1e-5}
REGENERATION_ATOL = 1e-12


@dataclass(frozen=True)
class Case:
    """One fixture: a layer config, input sizes and how to call it."""

    name: str
    description: str
    config: dict
    seed: int
    batch: int
    seq_q: int
    seq_kv: int | None = None
    """None: self-attention (key = value = query)."""
    forward: dict = field(default_factory=dict)
    """Non-tensor forward arguments (is_causal, need_weights, average_attn_weights)."""
    padding: bool = False
    """A key_padding_mask (True = ignore) with a few padded keys per row."""
    attn_mask: bool = False
    """An additive float attn_mask (Sq, Skv)."""
    chunks: list[int] | None = None
    """Feed the sequence in chunks of these sizes through one KVCache; expected outputs are of the whole sequence."""


CASES = [
    Case("self_attention", "packed QKV self-attention, weights per head", dict(embed_dim=16, num_heads=4), 11, 2, 6,
         forward=dict(average_attn_weights=False)),
    Case("cross_attention", "kdim/vdim cross-attention with padded memory", dict(embed_dim=16, num_heads=2, kdim=10, vdim=12),
         12, 2, 5, 8, padding=True, forward=dict(need_weights=False)),
    Case("dk_ne_dv", "head_dim 5, v_head_dim 7 (heads do not tile embed_dim)", dict(embed_dim=18, num_heads=3, head_dim=5, v_head_dim=7),
         13, 2, 7, forward=dict(need_weights=False)),
    Case("gqa", "8 query heads sharing 2 KV heads, causal", dict(embed_dim=32, num_heads=8, num_kv_heads=2), 14, 2, 6,
         forward=dict(is_causal=True, need_weights=False)),
    Case("mqa", "6 query heads sharing 1 KV head, additive attn_mask", dict(embed_dim=24, num_heads=6, num_kv_heads=1), 15, 2, 4, 9,
         attn_mask=True, forward=dict(need_weights=False)),
    Case("kv_cache", "prefill 6 positions then 3 decode steps, GQA, left padding", dict(embed_dim=32, num_heads=4, num_kv_heads=2),
         16, 2, 9, padding=True, chunks=[6, 1, 1, 1], forward=dict(is_causal=True, need_weights=False)),
    Case("streaming", "14 positions streamed in uneven chunks", dict(embed_dim=24, num_heads=4, num_kv_heads=2), 17, 1, 14,
         chunks=[4, 3, 5, 2], forward=dict(is_causal=True, need_weights=False)),
    Case("dropout_large_batch", "batch 64, dropout 0.2 with the keep-mask stored", dict(embed_dim=16, num_heads=2, dropout=0.2),
         18, 64, 8, forward=dict(need_weights=False)),
    Case("causal_padding", "causal + key padding, averaged weights", dict(embed_dim=16, num_heads=4), 19, 3, 7, padding=True,
         forward=dict(is_causal=True)),
]  # fmt: skip
CASES_BY_NAME = {case.name: case for case in CASES}


def generate(case: Case) -> dict[str, torch.Tensor]:
    """Parameters, inputs, masks and float64 reference outputs of ``case``."""
    gen = torch.Generator().manual_seed(case.seed)
    module = MultiHeadAttention(**case.config, batch_first=True, backend="reference", dtype=torch.float64)
    tensors = {f"param.{name}": torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.4 for name, p in module.named_parameters()}
    seq_kv = case.seq_kv or case.seq_q
    tensors["input.query"] = torch.randn(case.batch, case.seq_q, module.embed_dim, generator=gen, dtype=torch.float64)
    if case.seq_kv is not None:
        tensors["input.key"] = torch.randn(case.batch, seq_kv, module.kdim, generator=gen, dtype=torch.float64)
        tensors["input.value"] = torch.randn(case.batch, seq_kv, module.vdim, generator=gen, dtype=torch.float64)
    if case.padding:
        padded = torch.randint(0, seq_kv // 2, (case.batch,), generator=gen)
        positions = torch.arange(seq_kv)
        # Left padding for cached decoding (prompts end together), right padding otherwise.
        pad = positions < padded[:, None] if case.chunks else positions >= seq_kv - padded[:, None]
        tensors["input.key_padding_mask"] = pad
    if case.attn_mask:
        tensors["input.attn_mask"] = torch.randn(case.seq_q, seq_kv, generator=gen, dtype=torch.float64)
    if module.dropout > 0:
        shape = (case.batch, module.num_heads, case.seq_q, seq_kv)
        tensors["input.dropout_mask"] = torch.rand(shape, generator=gen) >= module.dropout
    load_parameters(module, tensors)
    # Expected outputs always come from the whole sequence: chunked cases must reproduce it.
    out, weights = module(**_forward_inputs(tensors, torch.float64), **case.forward)
    tensors["expected.out"] = out.detach()
    if weights is not None:
        tensors["expected.weights"] = weights.detach()
    return tensors


def load_parameters(module: MultiHeadAttention, tensors: dict[str, torch.Tensor]) -> None:
    params = {name.removeprefix("param."): t for name, t in tensors.items() if name.startswith("param.")}
    module.load_state_dict(params)
    module.train(module.dropout > 0)  # dropout only acts in training mode


def _forward_inputs(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    names = ("query", "key", "value", "key_padding_mask", "attn_mask", "dropout_mask")
    found = {name: tensors.get(f"input.{name}") for name in names}
    return {name: t.to(dtype) if t.is_floating_point() else t for name, t in found.items() if t is not None}


def call_case(module: MultiHeadAttention, case: Case, tensors: dict[str, torch.Tensor], dtype: torch.dtype, **overrides):
    """Run ``case`` as the fixture prescribes (whole, or chunk by chunk through a KVCache) -> ``(out, weights | None)``.

    ``overrides`` replace forward arguments of the case (e.g. ``need_weights=False``)."""
    inputs, forward = _forward_inputs(tensors, dtype), case.forward | overrides
    if case.chunks is None:
        return module(**inputs, **forward)
    cache, outs, start = KVCache(), [], 0
    padding = inputs.get("key_padding_mask")
    for size in case.chunks:
        step = slice(start, start + size)
        kwargs = {} if padding is None else {"key_padding_mask": padding[:, step]}
        outs.append(module(inputs["query"][:, step], kv_cache=cache, **kwargs, **forward)[0])
        start += size
    return torch.cat(outs, dim=1), None


def build_module(case: Case, tensors: dict[str, torch.Tensor], backend: str, dtype: torch.dtype) -> MultiHeadAttention:
    module = MultiHeadAttention(**case.config, batch_first=True, backend=backend, dtype=torch.float64)
    load_parameters(module, tensors)
    return module.to(dtype)


def manifest_entry(case: Case, tensors: dict[str, torch.Tensor]) -> dict:
    entry = asdict(case) | {"file": f"{case.name}.safetensors", "tolerance": TOLERANCE}
    entry["tensors"] = {name: f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}" for name, t in sorted(tensors.items())}
    return entry


def manifest_text(generated: dict[str, dict[str, torch.Tensor]]) -> str:
    manifest = {
        "about": "MultiHeadAttention golden fixtures; regenerate with `python scripts/golden.py`.",
        "reference": "attnkit.ops backend 'reference' (float64)",
        "cases": {case.name: manifest_entry(case, generated[case.name]) for case in CASES},
    }
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def write() -> None:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    generated = {case.name: generate(case) for case in CASES}
    for name, tensors in generated.items():
        save_file(tensors, GOLDEN_DIR / f"{name}.safetensors")
    MANIFEST.write_text(manifest_text(generated))


def _tensor_differences(case: str, stored: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]) -> list[str]:
    problems = [f"{case}: tensor {name} is stored but no longer generated" for name in sorted(set(stored) - set(fresh))]
    problems += [f"{case}: tensor {name} is generated but not stored" for name in sorted(set(fresh) - set(stored))]
    for name in sorted(set(stored) & set(fresh)):
        old, new = stored[name], fresh[name]
        if old.shape != new.shape or old.dtype != new.dtype:
            problems.append(f"{case}: {name} stored {tuple(old.shape)} {old.dtype}, generated {tuple(new.shape)} {new.dtype}")
            continue
        atol = REGENERATION_ATOL if name.startswith("expected.") else 0.0
        diff = (old.double() - new.double()).abs().max().item() if old.numel() else 0.0
        if diff > atol:
            problems.append(f"{case}: {name} differs, max |stored - generated| = {diff:.3e} (allowed {atol:g})")
    return problems


def check() -> list[str]:
    """Regenerate in memory and list every difference from the stored fixtures (empty when current)."""
    generated = {case.name: generate(case) for case in CASES}
    problems = []
    stored_manifest = MANIFEST.read_text() if MANIFEST.exists() else ""
    fresh_manifest = manifest_text(generated)
    if stored_manifest != fresh_manifest:
        diff = difflib.unified_diff(
            stored_manifest.splitlines(), fresh_manifest.splitlines(), "stored manifest.json", "generated", lineterm=""
        )
        problems.append("manifest.json differs:\n" + "\n".join(diff))
    for name, tensors in generated.items():
        path = GOLDEN_DIR / f"{name}.safetensors"
        if not path.exists():
            problems.append(f"{name}: {path.name} is missing")
            continue
        problems += _tensor_differences(name, load_file(path), tensors)
    expected_files = {f"{name}.safetensors" for name in generated}
    stray = [path.name for path in sorted(GOLDEN_DIR.glob("*.safetensors")) if path.name not in expected_files]
    problems += [f"{name}: stored but not a case" for name in stray]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on any difference")
    args = parser.parse_args(argv)
    if not args.check:
        write()
        size = sum(path.stat().st_size for path in GOLDEN_DIR.glob("*.safetensors"))
        print(f"wrote {len(CASES)} cases to {GOLDEN_DIR} ({size / 1024:.0f} KiB)")
        return 0
    problems = check()
    for problem in problems:
        print(problem)
    print("golden fixtures are current" if not problems else f"{len(problems)} difference(s); run `python scripts/golden.py` if intended")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
