"""Zarr v3 arrays for frames, latents and trajectories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from vfx.errors import BadInput


# Every chunk carries a CRC-32C of its stored bytes, so a damaged chunk fails to read instead of
# decoding to garbage (zstd first, then the checksum over the compressed bytes).
CODECS = {"compressors": [ZstdCodec(level=0, checksum=False), Crc32cCodec()]}


class DamagedArtifact(BadInput):
    """A stored array that fails to read back: exit 2, naming it and the command that repairs it."""


def create_array(
    path: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, attrs: dict[str, Any] | None = None
) -> "CheckedArray":
    """A fresh array at `path` (replacing any old one), chunked as given, every chunk checksummed."""
    array = zarr.create_array(
        store=str(path),
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=0,
        attributes=attrs or {},
        overwrite=True,
        **CODECS,
    )
    return CheckedArray(array, Path(path))


def open_array(path: Path, mode: str = "r") -> "CheckedArray":
    try:
        return CheckedArray(zarr.open_array(store=str(path), mode=mode), Path(path))
    except (FileNotFoundError, NotADirectoryError, zarr.errors.ArrayNotFoundError, zarr.errors.NodeNotFoundError):
        raise BadInput(f"{path} is not a Zarr array") from None
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:  # a torn or edited zarr.json
        raise DamagedArtifact(f"{path} has unreadable metadata ({type(exc).__name__}){repair_hint(Path(path))}") from None


class CheckedArray:
    """A Zarr array whose damaged chunks raise DamagedArtifact (naming the repair) instead of a codec error.

    Everything else (shape, chunks, attrs, resize, writes) is the Zarr array's own.
    """

    def __init__(self, array: zarr.Array, path: Path):
        self._array, self.path = array, path

    def __getattr__(self, name: str):
        return getattr(self._array, name)

    def __getitem__(self, key):
        return self._read(self._array.__getitem__, key)

    def __setitem__(self, key, value) -> None:
        self._array[key] = value

    def __array__(self, dtype=None, copy=None):
        data = self[...]
        return data if dtype is None else data.astype(dtype)

    def __len__(self) -> int:
        return len(self._array)

    @property
    def oindex(self) -> "_CheckedIndex":
        return _CheckedIndex(self, self._array.oindex)

    def _read(self, getter, key):
        try:
            return getter(key)
        except (ValueError, RuntimeError, OSError) as exc:
            if isinstance(exc, OSError) and not _is_decode_error(exc):
                raise
            raise DamagedArtifact(f"{self.path} is damaged: a chunk fails to read back ({str(exc)[:80]})"
                                  f"{repair_hint(self.path)}") from None


class _CheckedIndex:
    def __init__(self, owner: CheckedArray, index):
        self._owner, self._index = owner, index

    def __getitem__(self, key):
        return self._owner._read(self._index.__getitem__, key)


def _is_decode_error(exc: OSError) -> bool:
    return "decompress" in str(exc).lower() or "zstd" in str(exc).lower()


def repair_hint(path: Path) -> str:
    """'; rerun `vfx STAGE DIR …` to repair it' for an array inside a project's stage folder, else ''."""
    from vfx import graph

    for root in Path(path).resolve().parents:
        if (root / "vfx.toml").is_file():
            found = graph.stage_of_folder(str(Path(path).resolve().parent.relative_to(root)))
            if found:
                stage, name = found
                return f"; run `{graph.spec(stage).command_for(root, name)}` to repair it"
            return ""
    return ""


def chunk_ranges(total: int, size: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges of consecutive chunks of `size` frames."""
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def describe(array) -> dict[str, Any]:
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
