"""`vfx inspect`: one artifact's shape, dtype, chunks and attributes, and a contact-sheet preview."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vfx.errors import BadInput
from vfx.fsutil import read_json
from vfx.stage import RECORD
from vfx.store import describe, open_array


def find_arrays(path: Path) -> list[Path]:
    """The Zarr arrays at `path`: itself, or those directly inside a stage folder."""
    if (path / "zarr.json").is_file():
        return [path]
    return sorted(p.parent for p in path.glob("*/zarr.json"))


def inspect_path(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file or folder")
    result: dict = {"path": str(path)}
    if path.is_dir() and (path / RECORD).is_file():
        result["record"] = read_json(path / RECORD)
        if result["record"] is None:
            raise BadInput(f"{path / RECORD} is not readable JSON (a torn write?); rerun the stage that made it")
    arrays = find_arrays(path) if path.is_dir() else []
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "np") as handle:
                result["tensors"] = {k: {"shape": list(handle.get_slice(k).get_shape()),
                                         "dtype": handle.get_slice(k).get_dtype()} for k in handle.keys()}
                result["metadata"] = handle.metadata()
        except (SafetensorError, OSError, ValueError) as exc:
            raise BadInput(f"{path} is not a readable safetensors file: {exc}") from None
        return result
    if not arrays and "record" not in result:
        raise BadInput(f"{path} is not a vfx artifact (no Zarr array, stage record or safetensors file)")
    result["arrays"] = {p.name: describe(open_array(p)) for p in arrays}
    return result


def _normalise(tile: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(tile, 1), np.percentile(tile, 99)
    return ((np.clip(tile, lo, hi) - lo) / max(hi - lo, 1e-8) * 255).astype(np.uint8)


def to_tiles(data: np.ndarray) -> list[np.ndarray]:
    """RGB tiles from frames [N,H,W,3], latents [N,C,h,w] (a grey tile per channel), flow [N,2,H,W], masks."""
    if data.ndim == 4 and data.shape[-1] == 3 and data.dtype == np.uint8:
        return list(data)
    if data.ndim == 4 and data.shape[1] == 2:
        from vfx.visual import flow_to_rgb

        return [flow_to_rgb(f) for f in data.astype(np.float32)]
    if data.ndim == 3 and data.dtype == np.uint8:  # masks or edge maps [N, H, W]: as they are, brightest = 255
        peak = max(int(data.max()), 1)
        return [np.repeat((mask.astype(np.uint16) * 255 // peak).astype(np.uint8)[..., None], 3, axis=-1) for mask in data]
    if data.ndim == 3:
        data = data[:, None]
    if data.ndim == 4:
        tiles = []
        for item in data.astype(np.float32):
            grey = np.concatenate([_normalise(channel) for channel in item], axis=1)
            tiles.append(np.repeat(grey[..., None], 3, axis=-1))
        return tiles
    raise BadInput(f"cannot preview an array of shape {data.shape}")


def contact_sheet(array_path: Path, out: Path, max_tiles: int = 16, columns: int = 4) -> Path:
    array = open_array(array_path)
    data = array
    while data.ndim > 4:  # trajectories [T, N, ...]: show the cleanest timestep
        data = data[0] if not isinstance(data, np.ndarray) else data[0]
    count = data.shape[0]
    picks = np.unique(np.linspace(0, count - 1, min(count, max_tiles)).round().astype(int))
    tiles = to_tiles(np.stack([np.asarray(data[int(i)]) for i in picks]))
    height, width = tiles[0].shape[:2]
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    sheet = np.full((rows * (height + 2), columns * (width + 2), 3), 32, np.uint8)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, columns)
        sheet[r * (height + 2) : r * (height + 2) + height, c * (width + 2) : c * (width + 2) + width] = tile
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(out)
    return out
