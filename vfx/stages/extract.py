"""`vfx extract`: a video or image folder -> frames/frames.zarr (uint8 [N, H, W, 3]).

Decoding is sequential, so extract is one unit of work: it streams frames into a scratch array
chunk by chunk (never holding the video in memory) and swaps it in only when complete, so a
failure leaves any earlier frames untouched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np

from vfx import log
from vfx.errors import BadInput
from vfx.media import Selection, iter_source, probe, resize_cover, target_size
from vfx.project import Project
from vfx.stage import StageRun
from vfx.store import create_array

FOLDER = "frames"
ARRAY = "frames.zarr"


def source_identity(path: Path) -> str:
    """Path, sizes and modification times: changes when the source changes, cheap to compute."""
    path = Path(path).resolve()
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    digest = hashlib.sha256(str(path).encode())
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def extract(
    project: Project,
    source: Path,
    size: tuple[int, int] | None,
    short_side: int | None,
    selection: Selection,
    chunk_frames: int,
    force: bool = False,
) -> dict:
    selection.validate()
    if chunk_frames < 1:
        raise BadInput(f"invalid chunk size {chunk_frames}: must be at least 1")
    info = probe(source)
    width, height = target_size(info.width if info.rotation % 180 == 0 else info.height,
                                info.height if info.rotation % 180 == 0 else info.width, size, short_side)
    if width < 8 or height < 8:
        raise BadInput(f"{source} is {info.width}x{info.height}: too small for a multiple-of-8 frame")
    params = {
        "source": str(Path(source).resolve()),
        "source_id": source_identity(source),
        "size": [width, height],
        "start": selection.start,
        "end": selection.end,
        "stride": selection.stride,
        "fps": selection.fps,
        "max_frames": selection.max_frames,
        "chunk_frames": chunk_frames,
    }
    folder = project.path(FOLDER)
    run = StageRun(folder, "extract", params, {}, 1, force=force)
    if run.up_to_date() and not force:
        log.info(f"extract: up to date ({folder}); pass --force to recompute")
        return {"stage": "extract", "state": "complete", "up_to_date": True, **run.folder.record()["summary"]}

    began = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / f".tmp-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    out_fps = selection.output_fps(info.fps)
    try:
        array = create_array(scratch / ARRAY, (0, height, width, 3), (chunk_frames, height, width, 3), "uint8")
        count, buffer = 0, []

        def flush() -> None:
            nonlocal count, buffer
            if buffer:
                array.resize((count + len(buffer), height, width, 3))
                array[count : count + len(buffer)] = np.stack(buffer)
                count += len(buffer)
                buffer = []

        expected = selection.max_frames or info.frames or 0
        with log.progress("extract", expected, "frames") as bar:
            for frame in selection.select(iter_source(info)):
                buffer.append(resize_cover(frame, width, height))
                bar.advance()
                if len(buffer) == chunk_frames:
                    flush()
            flush()
        if count == 0:
            raise BadInput(f"no frames selected from {source} (check --start/--end)")
        summary = {
            "frames": count,
            "width": width,
            "height": height,
            "fps": str(out_fps),
            "fps_float": float(out_fps),
            "source": info.as_dict(),
        }
        array.attrs.update(summary)

        def swap_in() -> None:
            old = folder / f".old-{os.getpid()}"
            if (folder / ARRAY).exists():
                os.replace(folder / ARRAY, old)
            os.replace(scratch / ARRAY, folder / ARRAY)
            shutil.rmtree(old, ignore_errors=True)

        run.complete_single(summary, began, swap_in)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info(f"extract: {count} frames {width}x{height} at {float(out_fps):.3g} fps -> {folder / ARRAY}")
    return {"stage": "extract", "state": "complete", "up_to_date": False, **summary}
