"""One self-contained HTML page for a report: its tables, an inline-SVG roofline and per-layer times.

No scripts, fonts, images or styles are fetched from anywhere; the file opens offline.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

from attnkit.hardware.profiles import dtype_key
from attnkit.analyze.report import AnalysisReport, KernelRow
from attnkit.utils.dtypes import parse_dtype
from attnkit.utils.tables import html_table

__all__ = ["to_html", "roofline_svg"]

_COLORS = {
    "gemm": "#1f77b4", "qkv-gemm": "#17becf", "conv": "#9467bd", "attention": "#d62728",
    "reduction": "#2ca02c", "pointwise": "#ff7f0e", "gather": "#8c564b", "copy": "#7f7f7f", "factory": "#bcbd22",
    "relayout": "#7f7f7f",
}
_WIDTH, _HEIGHT, _PAD = 760, 460, 60
_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:8px 0 24px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}td.n{text-align:right}.bar{background:#9ecae1;height:12px}
svg text{font-size:11px;font-family:inherit}
"""


@dataclass(frozen=True)
class _Axes:
    """Log-log plot area: intensity (FLOP/byte) across, attained FLOP/s up."""

    x_low: float
    x_high: float
    y_low: float
    y_high: float
    width: float = _WIDTH - 2 * _PAD
    height: float = _HEIGHT - 2 * _PAD

    def point(self, intensity: float, rate: float) -> tuple[float, float]:
        """Pixel position, clamped to the plot area."""
        def frac(value, low, high):
            value = min(max(value, low), high)
            return (math.log10(value) - math.log10(low)) / (math.log10(high) - math.log10(low))
        return (_PAD + frac(intensity, self.x_low, self.x_high) * self.width,
                _PAD + self.height - frac(rate, self.y_low, self.y_high) * self.height)

    def grid(self) -> list[str]:
        parts = [f'<rect x="{_PAD}" y="{_PAD}" width="{self.width}" height="{self.height}" fill="none" stroke="#444"/>']
        for exponent in range(round(math.log10(self.x_low)), round(math.log10(self.x_high)) + 1):
            x, bottom = self.point(10.0**exponent, self.y_low)
            parts.append(f'<line x1="{x:.1f}" y1="{_PAD}" x2="{x:.1f}" y2="{bottom:.1f}" stroke="#eee"/>'
                         f'<text x="{x:.1f}" y="{bottom + 16:.1f}" text-anchor="middle">1e{exponent}</text>')
        for exponent in range(round(math.log10(self.y_low)), round(math.log10(self.y_high)) + 1):
            left, y = self.point(self.x_low, 10.0**exponent)
            parts.append(f'<line x1="{left:.1f}" y1="{y:.1f}" x2="{left + self.width:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                         f'<text x="{left - 6:.1f}" y="{y + 4:.1f}" text-anchor="end">1e{exponent}</text>')
        parts.append(f'<text x="{_PAD + self.width / 2}" y="{_HEIGHT - 14}" text-anchor="middle">'
                     f'arithmetic intensity (FLOP/byte)</text><text transform="translate(16,{_PAD + self.height / 2}) '
                     f'rotate(-90)" text-anchor="middle">attained FLOP/s (predicted)</text>')
        return parts


def _ceiling(axes: _Axes, bandwidth: float, rate: float, label: str, color: str, dash: str, offset: int) -> str:
    """The memory roof up to the ridge point, then flat at ``rate``."""
    (x0, y0), (x1, y1) = axes.point(axes.x_low, bandwidth * axes.x_low), axes.point(rate / bandwidth, rate)
    x2, y2 = axes.point(axes.x_high, rate)
    return (f'<polyline class="ceiling" points="{x0:.1f},{y0:.1f} {x1:.1f},{y1:.1f} {x2:.1f},{y2:.1f}" fill="none" '
            f'stroke="{color}" stroke-width="2"{dash}/><text x="{x2 - 4:.1f}" y="{y2 + offset:.1f}" '
            f'text-anchor="end" fill="{color}">{label} {rate / 1e12:.0f} TFLOP/s</text>')


def roofline_svg(report: AnalysisReport, mode: str) -> str:
    """An inline ``<svg id="roofline">``: attained FLOP/s vs FLOP/byte, one circle per kernel with FLOPs.

    Ceilings: the memory roof (achievable bandwidth x intensity) under the peak matmul rate, the
    achievable matmul rate and the achievable fused-attention rate for the report's dtype.
    Kernels without FLOPs cannot sit on a log axis; the caption counts them.
    """
    hw, key = report.hardware, dtype_key(parse_dtype(report.dtype))
    achievable = 1e12 * hw["achievable_tflops"].get(key, hw["achievable_tflops"].get("fp32"))
    peak = 1e12 * hw["peak_tflops"].get(key, achievable / 1e12)
    attention = 1e12 * hw.get("attention_tflops", {}).get(key, achievable / 2e12)
    bandwidth = 1e9 * hw["achievable_bandwidth_gbs"]
    y_high = 10 ** math.ceil(math.log10(peak * 1.5))
    axes = _Axes(0.1, 1e4, y_high / 1e5, y_high)
    parts = [f'<svg id="roofline" width="{_WIDTH}" height="{_HEIGHT}" viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img">'
             '<rect width="100%" height="100%" fill="#fff"/>', *axes.grid(),
             _ceiling(axes, bandwidth, peak, "peak matmul", "#000", ' stroke-dasharray="6 4"', -6),
             _ceiling(axes, bandwidth, achievable, "achievable matmul", "#000", "", 14),
             _ceiling(axes, bandwidth, attention, "achievable attention", _COLORS["attention"],
                      ' stroke-dasharray="2 3"', 14)]
    kernels = [k for k in report.mode(mode).kernels if k.flops > 0 and k.time_s > 0]
    for kernel in kernels:
        x, y = axes.point(kernel.intensity, kernel.flops / kernel.time_s)
        parts.append(f'<circle class="kernel" cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{_COLORS.get(kernel.category, "#444")}"'
                     f' fill-opacity="0.75" stroke="#000" stroke-width="0.5"><title>{html.escape(_describe(kernel))}'
                     '</title></circle>')
    for index, category in enumerate(sorted({k.category for k in kernels})):
        y = _PAD + 14 + 16 * index
        parts.append(f'<circle cx="{_PAD + 14}" cy="{y}" r="5" fill="{_COLORS.get(category, "#444")}"/>'
                     f'<text x="{_PAD + 24}" y="{y + 4}">{category}</text>')
    skipped = len(report.mode(mode).kernels) - len(kernels)
    return "".join(parts) + (f"</svg><p>{len(kernels)} kernels with FLOPs plotted ({mode} mode); {skipped} "
                             "memory-only kernels have no FLOPs to plot.</p>")


def _describe(kernel: KernelRow) -> str:
    return (f"{kernel.name} [{kernel.layer}] {kernel.flops / 1e9:.3f} GFLOP, {kernel.bytes / 1e6:.2f} MB, "
            f"{kernel.intensity:.1f} FLOP/B, {kernel.bound}-bound, {kernel.time_s * 1e3:.4f} ms")


def _layer_bars(report: AnalysisReport, mode: str) -> str:
    times = report.layer_times(mode)
    longest = max(times.values(), default=0.0) or 1.0
    rows = "".join(f'<tr><td>{html.escape(layer)}</td><td class=n>{seconds * 1e3:.4f}</td><td><div class="bar" '
                   f'style="width:{300 * seconds / longest:.0f}px"></div></td></tr>' for layer, seconds in times.items())
    return f"<table><tr><th>layer</th><th>predicted ms</th><th></th></tr>{rows}</table>"


def to_html(report: AnalysisReport) -> str:
    """The whole page as a string (write it to a ``.html`` file): header, ``report.tables()`` with the
    roofline and per-layer bars after the totals and savings."""
    mode = report.modes[-1].mode
    e = html.escape
    tables = [html_table(*table) for table in report.tables()]
    return "".join([
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>attnkit analyze: {e(report.model)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>attnkit analyze: {e(report.model)}</h1>",
        "".join(f"<p>{e(line)}</p>" for line in report.header_lines()),
        *tables[:2],
        f"<h2>Roofline ({e(mode)})</h2>", roofline_svg(report, mode),
        f"<h2>Predicted time per layer ({e(mode)})</h2>", _layer_bars(report, mode),
        *tables[2:],
        "".join(f"<p><small>{e(note)}</small></p>" for note in report.notes),
        "</body></html>",
    ])
