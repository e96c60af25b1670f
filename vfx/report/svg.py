"""Per-frame curves as inline SVG (no plotting library, no script)."""

from __future__ import annotations

from html import escape

from vfx.plot import COLOURS

WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 640, 210, 56, 12, 40, 26


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _colour(index: int) -> str:
    red, green, blue = COLOURS[index % len(COLOURS)]
    return f"#{red:02x}{green:02x}{blue:02x}"


def line_plot(title: str, series: dict[str, list]) -> str:
    """One panel: a line per label over the index (None breaks a line), y range from the values."""
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM
    out = [f'<svg class="plot" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img">'
           f'<title>{escape(title)}</title>',
           f'<text x="{x0}" y="14" class="plot-title">{escape(title)}</text>',
           f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" class="frame"/>']
    numbers = [v for values in series.values() for v in values if v is not None]
    length = max((len(values) for values in series.values()), default=0)
    if not numbers:
        out.append(f'<text x="{(x0 + x1) // 2}" y="{(y0 + y1) // 2}" class="empty">no values</text></svg>')
        return "".join(out)
    low, high = min(numbers), max(numbers)
    if high - low < 1e-12:  # a flat curve: give it some room
        low, high = low - 0.5 * (abs(low) or 1), high + 0.5 * (abs(high) or 1)

    def x_of(i: int) -> float:
        return x0 + (x1 - x0) * i / max(length - 1, 1)

    def y_of(v: float) -> float:
        return y1 - (y1 - y0) * (v - low) / (high - low)

    for value in (low, (low + high) / 2, high):
        out.append(f'<text x="{x0 - 4}" y="{y_of(value) + 4:.1f}" class="tick" text-anchor="end">{_fmt(value)}</text>')
    for i in sorted({0, length // 2, length - 1}):
        out.append(f'<text x="{x_of(i):.1f}" y="{y1 + 16}" class="tick" text-anchor="middle">{i}</text>')
    legend_x = x0
    for index, (label, values) in enumerate(series.items()):
        colour = _colour(index)
        runs, run = [], []
        for i, value in enumerate(list(values) + [None]):
            if value is None:
                if run:
                    runs.append(run)
                run = []
            else:
                run.append((x_of(i), y_of(value)))
        for run in runs:
            if len(run) == 1:
                out.append(f'<circle cx="{run[0][0]:.1f}" cy="{run[0][1]:.1f}" r="2.5" fill="{colour}"/>')
            else:
                points = " ".join(f"{x:.1f},{y:.1f}" for x, y in run)
                out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out.append(f'<rect x="{legend_x}" y="21" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{legend_x + 14}" y="30" class="legend">{escape(label)}</text>')
        legend_x += 28 + 7 * len(label)
    out.append("</svg>")
    return "".join(out)
