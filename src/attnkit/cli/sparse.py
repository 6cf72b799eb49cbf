"""`attnkit sparse MODEL --pattern window:2048`: per attention layer, the pattern's block density and the FLOPs it saves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import typer

_PROBE_SEQ = 32
"""Sequence length of the real-valued build that causality is read on (the main build is shapes only)."""
_PATTERNS = "window:N, documents:N (N equal packed documents), bigbird:W,G,R (window, global tokens, random blocks) or topk:DENSITY"


def _numbers(text: str, kind: type, count: int, spec: str) -> list:
    """The ``count`` comma-separated numbers after ``kind:`` in ``text`` (the first > 0, the others >= 0)."""
    from attnkit.errors import fail

    parts = text.partition(":")[2].split(",")
    try:
        values = [kind(part) for part in parts]
    except ValueError:
        values = []
    if len(values) != count or any(v <= 0 for v in values[:1]) or any(v < 0 for v in values):
        fail("--pattern", f"{spec} with {count} positive number(s); one of {_PATTERNS}", text)
    return values


def parse_pattern(text: str, block_size: int) -> Callable[[bool, int], object]:
    """``--pattern`` -> ``make(causal, seq_kv)`` building the pattern for one attention (causal or not)."""
    from attnkit.errors import check_arg, fail
    from attnkit.sparse import BigBird, ContentAware, Documents, SlidingWindow

    kind = text.partition(":")[0]
    if kind == "window":
        (window,) = _numbers(text, int, 1, "window:N")
        return lambda causal, seq_kv: SlidingWindow(window, causal=causal)
    if kind == "documents":
        (count,) = _numbers(text, int, 1, "documents:N")

        def documents(causal: bool, seq_kv: int):
            check_arg(count <= seq_kv, "--pattern", f"at most {seq_kv} documents (one token each) at this length", text)
            size = seq_kv // count
            return Documents((size,) * (count - 1) + (seq_kv - size * (count - 1),), causal=causal)

        return documents
    if kind == "bigbird":
        window, num_global, num_random = _numbers(text, int, 3, "bigbird:W,G,R")
        return lambda causal, seq_kv: BigBird(window, num_global, num_random, block=block_size, causal=causal)
    if kind == "topk":
        (density,) = _numbers(text, float, 1, "topk:DENSITY")
        check_arg(density <= 1, "--pattern", "topk:DENSITY with DENSITY in (0, 1]", text)

        def topk(causal: bool, seq_kv: int):
            config = ContentAware(block_size=block_size, density=density)
            return config if causal else ContentAware(block_size=block_size, density=density, base=SlidingWindow(seq_kv, causal=False))

        return topk
    fail("--pattern", f"one of {_PATTERNS}", text)


def register(app: typer.Typer) -> None:
    """Add this subcommand to `app`."""

    @app.command("sparse")
    def sparse_command(
        model: str = typer.Argument(..., help="Zoo name (llama-gqa, gpt2, bert-base, ...) or package.module:function."),
        pattern: str = typer.Option(..., "--pattern", help=_PATTERNS + "."),
        batch: int = typer.Option(1, "--batch", help="Batch size."),
        seq: Optional[int] = typer.Option(None, "--seq", help="Sequence length (default: the model's)."),
        block: int = typer.Option(128, "--block", help="Block size in tokens (FlexAttention's default 128)."),
        json_path: Optional[Path] = typer.Option(None, "--json", help="Write the per-layer figures as JSON."),
    ) -> None:
        """Block density and FLOPs saved by a sparsity pattern on every attention of MODEL."""
        from attnkit.cli._inputs import check_inputs
        from attnkit.errors import check_arg

        check_inputs(models=model, batch=batch, seq=seq, outputs={"--json": json_path})
        check_arg(1 <= block <= 4096, "--block", "an integer from 1 to 4096", block)
        make = parse_pattern(pattern, block)

        from rich.console import Console
        from rich.table import Table

        from attnkit.discover import capture, find_attention
        from attnkit.models import build_model, default_seq_len
        from attnkit.sparse.report import site_sparsity

        console = Console()
        length = seq or default_seq_len(model)
        with console.status(f"finding the attention of {model} (shapes only)"):
            zoo = build_model(model, batch_size=batch, seq_len=seq, device="meta")

            def probe():
                small = build_model(model, batch_size=batch, seq_len=min(length, _PROBE_SEQ) if length else None)
                return capture(small.model, small.example_inputs, small.example_kwargs)

            sites = find_attention(capture(zoo.model, zoo.example_inputs, zoo.example_kwargs), probe=probe)
        rows = [site_sparsity(s.name, make(s.causal, s.seq_kv), batch=s.batch, heads=s.num_heads, seq_q=s.seq_q,
                              seq_kv=s.seq_kv, head_dim=s.head_dim_qk, causal=s.causal, block_size=block)
                for s in sites]  # fmt: skip

        table = Table(title=f"{pattern} on {model} (block {block})")
        for header in ("attention", "Sq x Skv", "causal", "density", "dense density", "GFLOP fwd", "saved"):
            table.add_column(header, overflow="fold")
        for r in rows:
            table.add_row(r.name, f"{r.seq_q}x{r.seq_kv}", "yes" if r.causal else "no", f"{r.density:.3f}",
                          f"{r.dense_density:.3f}", f"{r.flops / 1e9:.3g}", f"{r.saved:.1%}")  # fmt: skip
        console.print(table)
        if rows:
            total, dense = sum(r.flops for r in rows), sum(r.dense_flops for r in rows)
            console.print(f"{len(rows)} attention layers: {1 - total / dense:.1%} of attention FLOPs saved "
                          f"({dense / 1e9:.3g} -> {total / 1e9:.3g} GFLOP forward); speed-up needs a block-sparse kernel (GPU)")
        else:
            console.print("no attention found in this model")
        if json_path is not None:
            json_path.write_text(json.dumps({"schema_version": 1, "model": model, "pattern": pattern, "block": block,
                                             "layers": [r.to_json() for r in rows]}, indent=1))  # fmt: skip
            console.print(f"wrote {json_path}")
