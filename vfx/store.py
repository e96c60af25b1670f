"""Zarr v3 arrays for frames, latents and trajectories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from vfx.errors import BadInput


def create_array(
    path: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, attrs: dict[str, Any] | None = None
) -> zarr.Array:
    """A fresh array at `path` (replacing any old one), chunked as given."""
    return zarr.create_array(
        store=str(path),
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=0,
        attributes=attrs or {},
        overwrite=True,
    )


def open_array(path: Path, mode: str = "r") -> zarr.Array:
    try:
        return zarr.open_array(store=str(path), mode=mode)
    except (FileNotFoundError, zarr.errors.ArrayNotFoundError, zarr.errors.NodeNotFoundError):
        raise BadInput(f"{path} is not a Zarr array") from None


def chunk_ranges(total: int, size: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges of consecutive chunks of `size` frames."""
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def describe(array: zarr.Array) -> dict[str, Any]:
    return {
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "chunks": list(array.chunks),
        "attrs": dict(array.attrs),
        "bytes_stored": int(array.nbytes_stored()) if hasattr(array, "nbytes_stored") else None,
    }


def folder_size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
