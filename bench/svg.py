"""A hand-written SVG chart: the cumulative distribution of CNI ADD latency per subject, on a
logarithmic time axis (host-local's milliseconds and Python's hundred-odd share one chart)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

WIDTH, HEIGHT = 860, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 250, 40, 60
COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e")


def add_latency_cdf(series: Mapping[str, Sequence[float]], title: str) -> str:
    """An SVG document: one step line per series (milliseconds), y = share of execs done."""
    values = [v for vs in series.values() for v in vs if v > 0]
    lo = 10 ** math.floor(math.log10(min(values)))
    hi = 10 ** math.ceil(math.log10(max(values)))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(ms: float) -> float:
        return (
            LEFT
            + (math.log10(max(ms, lo)) - math.log10(lo))
            / (math.log10(hi) - math.log10(lo))
            * plot_w
        )

    def y(share: float) -> float:
        return TOP + (1 - share) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{LEFT}" y="22" font-size="15" font-weight="bold">{escape(title)}</text>',
    ]
    # Grid: decades and their 2x and 5x, shares in tenths.
    decade = lo
    while decade <= hi:
        for mult in (1, 2, 5):
            ms = decade * mult
            if ms > hi:
                break
            gx = x(ms)
            strong = mult == 1
            parts.append(
                f'<line x1="{gx:.1f}" y1="{TOP}" x2="{gx:.1f}" y2="{TOP + plot_h}" '
                f'stroke="{"#bbb" if strong else "#e5e5e5"}"/>'
            )
            label = f"{ms:g}"
            parts.append(
                f'<text x="{gx:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{label}</text>'
            )
        decade *= 10
    for tenth in range(11):
        gy = y(tenth / 10)
        parts.append(
            f'<line x1="{LEFT}" y1="{gy:.1f}" x2="{LEFT + plot_w}" y2="{gy:.1f}" '
            f'stroke="{"#bbb" if tenth % 5 == 0 else "#eee"}"/>'
        )
        parts.append(
            f'<text x="{LEFT - 6}" y="{gy + 4:.1f}" text-anchor="end">{tenth * 10}%</text>'
        )
    parts.append(
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 18}" text-anchor="middle">'
        "ADD latency per exec, ms (log scale)</text>"
    )
    parts.append(
        f'<text transform="translate(18,{TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">'
        "execs done within (CDF)</text>"
    )
    for i, (name, raw) in enumerate(series.items()):
        data = sorted(raw)
        n = len(data)
        color = COLORS[i % len(COLORS)]
        points = [f"{x(data[0]):.1f},{y(0):.1f}"]
        for k, ms in enumerate(data):
            points.append(f"{x(ms):.1f},{y(k / n):.1f}")
            points.append(f"{x(ms):.1f},{y((k + 1) / n):.1f}")
        parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="1.8" '
            f'points="{" ".join(points)}"/>'
        )
        p50 = data[n // 2]
        ly = TOP + 10 + i * 22
        lx = LEFT + plot_w + 14
        parts.append(
            f'<line x1="{lx}" y1="{ly}" x2="{lx + 22}" y2="{ly}" '
            f'stroke="{color}" stroke-width="3"/>'
        )
        parts.append(f'<text x="{lx + 28}" y="{ly + 4}">{escape(name)} (p50 {p50:.1f} ms)</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
