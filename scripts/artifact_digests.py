"""Print a SHA-256 of every artifact in a vfx project: the data of each Zarr array and the bytes of every
other output file, leaving out what records run times (stage records, unit markers, locks, metrics).

Two projects made by the same commands give the same digests when vfx's outputs are byte-identical, so
a before/after run of `make demo` checks that a change kept its results:

    python scripts/artifact_digests.py demo-before > before.txt
    python scripts/artifact_digests.py demo-after > after.txt
    diff before.txt after.txt
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import zarr

SKIPPED_NAMES = {"stage.json", "metrics.jsonl", "vfx.toml", "state.json"}
SKIPPED_SUFFIXES = {".lock"}


def is_array(folder: Path) -> bool:
    meta = folder / "zarr.json"
    return meta.is_file() and '"node_type": "array"' in meta.read_text().replace('":"', '": "')


def array_digest(folder: Path) -> str:
    array = zarr.open_array(str(folder), mode="r")
    data = np.ascontiguousarray(array[...])
    return f"{hashlib.sha256(data.tobytes()).hexdigest()[:16]} {data.dtype} {list(data.shape)}"


def digests(root: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    arrays = sorted(p.parent for p in root.rglob("zarr.json") if is_array(p.parent))
    for folder in arrays:
        found[str(folder.relative_to(root))] = array_digest(folder)
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if (not path.is_file() or any(folder in path.parents for folder in arrays) or path.name in SKIPPED_NAMES
                or path.suffix in SKIPPED_SUFFIXES or any(part.startswith(".") for part in rel.parts)):
            continue
        found[str(rel)] = file_digest(path)
    return found


def file_digest(path: Path) -> str:
    """A PNG by its pixels (its text chunks name model folders, which differ between projects)."""
    if path.suffix == ".png":
        from PIL import Image

        data = np.asarray(Image.open(path)).tobytes()
    else:
        data = path.read_bytes()
    return hashlib.sha256(data).hexdigest()[:16]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for name, digest in sorted(digests(Path(argv[0])).items()):
        print(f"{name}  {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
