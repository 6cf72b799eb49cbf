"""Print the README's result tables from committed files in benchmarks/results/.

    python scripts/results_tables.py            # all tables, Markdown

Every number the README quotes is printed here from a results file, so the README can be
regenerated and checked against the evidence.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _load(pattern: str) -> tuple[Path, dict]:
    path = sorted(RESULTS.glob(pattern))[-1]
    return path, json.loads(path.read_text())


def _header(path: Path, data: dict) -> str:
    return f"*{path.relative_to(RESULTS.parents[1])}: {data['device']}, torch {data['torch']}, {str(data['date'])[:10]}*\n"


def attention_table() -> str:
    path, data = _load("attention-nvidia-*.json")
    backends = ("cudnn", "flash", "efficient", "flex", "auto")
    tflops = {}
    for record in data["records"]:
        shape = record["shape"]
        if shape["head_dim"] == 128:
            key = (shape["seq"], shape["causal"], shape["backward"])
            tflops.setdefault(key, {})[record["backend"]] = record["tflops"]
    lines = [_header(path, data), "| seq | pass | mask | " + " | ".join(backends) + " |", "|---" * (3 + len(backends)) + "|"]
    for (seq, causal, backward), row in sorted(tflops.items()):
        cells = [f"{row[b]:.0f}" if row.get(b) else "-" for b in backends]
        lines.append(f"| {seq} | {'fwd+bwd' if backward else 'fwd'} | {'causal' if causal else 'full'} | " + " | ".join(cells) + " |")
    summaries = data["summaries"]
    within = sum(1 for s in summaries if s["auto_within_tolerance"])
    same = sum(1 for s in summaries if s["auto_chose_best"])
    lines.append(
        f"\nTFLOP/s at head dim 128, bf16. `auto` was within 2% of the fastest backend (paired timing) on "
        f"{within}/{len(summaries)} shapes of the head dim 64 and 128 grid and picked the fastest backend on {same}/{len(summaries)}."
    )
    return "\n".join(lines)


def analyze_table() -> str:
    path, data = _load("analyze/analyze-profile-*.json")
    lines = [
        _header(path, data),
        "| model | batch | mode | kernels predicted / measured | error | ms predicted / measured | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["records"]:
        if r.get("measured_ms") is None or r.get("predicted_ms") is None:
            lines.append(f"| {r['model']} | {r['batch']} | {r['mode']} | - | - | - | {r.get('note', '')} |")
            continue
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['mode']} | {r['predicted_kernels']} / {r['measured_kernels']:.0f} | "
            f"{r['kernel_error']:+.0%} | {r['predicted_ms']:.2f} / {r['measured_ms']:.2f} | {r['latency_error']:+.0%} |"
        )
    return "\n".join(lines)


def validate_table() -> str:
    path, data = _load("validate/validate-cuda-*.json")
    lines = [_header(path, data), "| model | dtype | result | wall s | worst fused-backend error / math-backend error (pass <= 2) |", "|---|---|---|---|---|"]
    for run in data["runs"]:
        report = json.loads((path.parent / run["report"]).read_text())
        ratios = [
            error["ratio"]
            for check in report["accuracy"]
            if check["backend"] not in ("math", "reference") and check.get("errors")
            for error in check["errors"].values()
            if error.get("ratio") is not None
        ]
        worst = f"{max(ratios):.2f}" if ratios else "-"
        lines.append(f"| {run['model']} | {run['dtype']} | {'pass' if run['passed'] else 'FAIL'} | {run['seconds']:.0f} | {worst} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for title, table in (("Attention backends", attention_table), ("Analyze", analyze_table), ("Validate", validate_table)):
        print(f"## {title}\n\n{table()}\n")
