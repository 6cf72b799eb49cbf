"""Which ``nn.Linear`` layers to train in FP8: alignment rules plus a measured speed table.

FP8 only pays when the GEMM saving outweighs the casts: small layers run slower than bf16 (torchao
measured 0.44x at 4096^3). ``speedup_table.json`` (beside this file) holds fwd+bwd speed-ups of
compiled ``Float8Linear`` over compiled bf16 ``nn.Linear`` measured on a GPU by
``benchmarks/fp8/run.py --table``, on a grid of M x K x N. A shape is looked up at the grid point
at or below it on every axis (speed-up grows with size, so this errs towards keeping bf16); a shape
below the grid, or with no entry for the recipe, stays in bf16. ``delayed`` uses the tensorwise row
(the same GEMMs and casts).
"""

from __future__ import annotations

import bisect
import functools
import json
from pathlib import Path

from torch import nn

from attnkit.fp8.config import Float8TrainingConfig, Recipe

__all__ = ["load_speedup_table", "table_speedup", "keep_reason"]

_TABLE = Path(__file__).with_name("speedup_table.json")


@functools.lru_cache(maxsize=1)
def load_speedup_table() -> dict:
    """The committed table: ``{"device", "torch", "date", "command", "grid": {"M", "K", "N"}, "speedup":
    {recipe: {"MxKxN": speed-up}}}``; an empty table when the file is absent."""
    if not _TABLE.exists():
        return {"grid": {"M": [], "K": [], "N": []}, "speedup": {}}
    return json.loads(_TABLE.read_text())


def _floor(grid: list[int], value: int) -> int | None:
    i = bisect.bisect_right(sorted(grid), value)
    return sorted(grid)[i - 1] if i else None


def table_speedup(recipe: Recipe | str, m: int, k: int, n: int, table: dict | None = None) -> float | None:
    """Measured fwd+bwd speed-up of FP8 over bf16 at the grid point at or below (m, k, n); None if none."""
    table = load_speedup_table() if table is None else table
    recipe = Recipe(recipe)
    key = Recipe.TENSORWISE if recipe is Recipe.DELAYED else recipe
    rows = table["speedup"].get(key.value, {})
    point = [_floor(table["grid"][axis], v) for axis, v in zip("MKN", (m, k, n))]
    if None in point:
        return None
    return rows.get("x".join(map(str, point)))


def keep_reason(linear: nn.Linear, config: Float8TrainingConfig, table: dict | None = None) -> str | None:
    """Why ``linear`` stays in high precision under ``config`` (None: convert it)."""
    k, n, block = linear.in_features, linear.out_features, config.block_size
    if k % block or n % block:
        return f"in/out features {k}x{n} not divisible by {block} (_scaled_mm alignment)"
    if not config.auto_filter:
        return None
    m = config.auto_filter_tokens
    speedup = table_speedup(config.recipe, m, k, n, table)
    if speedup is None:
        return f"M x K x N = {m}x{k}x{n} is below the measured grid (small GEMMs lose to bf16)"
    if speedup < config.auto_filter_min_speedup:
        return f"measured speed-up {speedup:.2f}x at {m}x{k}x{n} < {config.auto_filter_min_speedup:.2f}x"
    return None
