"""Files the report writes next to its page: the source frames as a video, a contact sheet per edit."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from vfx.media import write_mp4
from vfx.store import chunk_ranges

SHEET_FRAMES, TILE_WIDTH, GAP = 6, 192, 4


def source_video(frames, fps: Fraction, path: Path) -> Path:
    """frames/frames.zarr as an H.264 video (the extracted frames, as every stage sees them)."""
    ranges = chunk_ranges(frames.shape[0], frames.chunks[0])
    write_mp4(path, (frame for start, end in ranges for frame in np.asarray(frames[start:end])), fps)
    return path


def sheet_indices(count: int, columns: int = SHEET_FRAMES) -> list[int]:
    """Up to `columns` frame indices spread evenly over `count` frames, first and last included."""
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, min(columns, count))}) if count else []


def contact_sheet(rows: list, path: Path, indices: list[int]) -> Path:
    """A PNG grid: one row per frame array (source, edit), one column per index; tiles at most
    TILE_WIDTH wide, white gaps."""
    height, width = rows[0].shape[1:3]
    scale = min(1.0, TILE_WIDTH / width)
    tile_w, tile_h = max(1, round(width * scale)), max(1, round(height * scale))
    sheet = Image.new("RGB", (len(indices) * (tile_w + GAP) + GAP, len(rows) * (tile_h + GAP) + GAP), (255, 255, 255))
    for r, frames in enumerate(rows):
        for c, index in enumerate(indices):
            tile = Image.fromarray(np.asarray(frames[index]))
            if tile.size != (tile_w, tile_h):
                tile = tile.resize((tile_w, tile_h), Image.Resampling.LANCZOS)
            sheet.paste(tile, (GAP + c * (tile_w + GAP), GAP + r * (tile_h + GAP)))
    sheet.save(path, format="PNG")
    return path
