"""Per-frame metric curves as a PNG, drawn with PIL (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
PANEL_W, PANEL_H, MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 720, 220, 70, 20, 28, 34


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _panel(draw: ImageDraw.ImageDraw, top: int, title: str, series: dict[str, list], font) -> None:
    left, right = MARGIN_L, PANEL_W - MARGIN_R
    y0, y1 = top + MARGIN_T, top + PANEL_H - MARGIN_B
    draw.text((left, top + 6), title, fill=(0, 0, 0), font=font)
    numbers = [v for values in series.values() for v in values if v is not None]
    length = max((len(values) for values in series.values()), default=0)
    if not numbers or length == 0:
        draw.text((left, (y0 + y1) // 2), "no values", fill=(120, 120, 120), font=font)
        return
    low, high = min(numbers), max(numbers)
    if high - low < 1e-12:  # a flat curve: give it some room
        low, high = low - 0.5 * (abs(low) or 1), high + 0.5 * (abs(high) or 1)

    def x_of(i: int) -> float:
        return left + (right - left) * (i / max(length - 1, 1))

    def y_of(v: float) -> float:
        return y1 - (y1 - y0) * (v - low) / (high - low)

    draw.rectangle((left, y0, right, y1), outline=(160, 160, 160))
    for value in (low, (low + high) / 2, high):
        y = y_of(value)
        draw.line((left - 4, y, left, y), fill=(0, 0, 0))
        draw.text((4, y - 6), _fmt(value), fill=(0, 0, 0), font=font)
    for i in sorted({0, length // 2, length - 1}):
        draw.text((x_of(i) - 4, y1 + 4), str(i), fill=(0, 0, 0), font=font)
    legend_x = left + int(draw.textlength(title, font=font)) + 24  # legend on the title row, off the curves
    for colour, (label, values) in zip(COLOURS, series.items()):
        run: list[tuple[float, float]] = []
        for i, value in enumerate(values + [None]):  # a None breaks the line
            if value is None:
                if len(run) > 1:
                    draw.line(run, fill=colour, width=2)
                elif run:
                    draw.ellipse((run[0][0] - 2, run[0][1] - 2, run[0][0] + 2, run[0][1] + 2), fill=colour)
                run = []
            else:
                run.append((x_of(i), y_of(value)))
        draw.rectangle((legend_x, top + 8, legend_x + 10, top + 16), fill=colour)
        draw.text((legend_x + 14, top + 6), label, fill=(0, 0, 0), font=font)
        legend_x += 24 + int(draw.textlength(label, font=font))


def plot_curves(path: Path, panels: list[tuple[str, dict[str, list]]]) -> Path:
    """One panel per (title, {label: per-frame values (None = undefined)}), stacked vertically."""
    panels = panels or [("nothing to plot", {})]
    image = Image.new("RGB", (PANEL_W, PANEL_H * len(panels)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for index, (title, series) in enumerate(panels):
        _panel(draw, index * PANEL_H, title, series, font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def eval_panels(summary: dict) -> list[tuple[str, dict[str, list]]]:
    """The panels for an eval summary: warp error per pair, PSNR/SSIM and CLIP per frame."""
    per_frame = summary.get("per_frame", {})
    panels = []
    if per_frame.get("warp_error"):
        flow = summary.get("flow") or {}
        panels.append((f"warp error x1e-3 per pair t-1 -> t (flow: {flow.get('method')} {flow.get('preset')})",
                       per_frame["warp_error"]))
    if per_frame.get("psnr"):
        panels.append(("reconstruction PSNR (dB) per frame", {"psnr": per_frame["psnr"]}))
        panels.append(("reconstruction SSIM per frame", {"ssim": per_frame["ssim"]}))
    if per_frame.get("clip_f"):
        panels.append(("CLIP-F (consecutive frames' cosine) per pair", per_frame["clip_f"]))
    if per_frame.get("clip_t"):
        panels.append(("CLIP-T (frame-prompt cosine) per frame", {"clip_t": per_frame["clip_t"]}))
    return panels
