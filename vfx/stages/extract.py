"""`vfx extract`: a video or image folder -> frames/frames.zarr (uint8 [N, H, W, 3]).

Decoding is sequential, so extract is one unit of work: it streams frames into a scratch array
chunk by chunk (never holding the video in memory) and swaps it in only when complete, so a
failure leaves any earlier frames untouched.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from vfx import log
from vfx.driver import SingleUnitStage, drive
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


class Extract(SingleUnitStage):
    label = "extract"

    def __init__(self, project: Project, source: Path, size: tuple[int, int] | None, short_side: int | None,
                 selection: Selection, chunk_frames: int, force: bool):
        selection.validate()
        if chunk_frames < 1:
            raise BadInput(f"invalid chunk size {chunk_frames}: must be at least 1")
        self.source, self.selection, self.chunk_frames = source, selection, chunk_frames
        self.info = info = probe(source)
        upright = info.rotation % 180 == 0
        self.width, self.height = target_size(info.width if upright else info.height,
                                              info.height if upright else info.width, size, short_side)
        if self.width < 8 or self.height < 8:
            raise BadInput(f"{source} is {info.width}x{info.height}: too small for a multiple-of-8 frame")
        params = {
            "source": str(Path(source).resolve()), "source_id": source_identity(source),
            "size": [self.width, self.height], "start": selection.start, "end": selection.end,
            "stride": selection.stride, "fps": selection.fps, "max_frames": selection.max_frames,
            "chunk_frames": chunk_frames,
        }
        self.run = StageRun(project.path(FOLDER), "extract", params, {}, 1, force=force)

    def build(self, scratch: Path) -> dict:
        width, height, chunk = self.width, self.height, self.chunk_frames
        array = create_array(scratch / ARRAY, (0, height, width, 3), (chunk, height, width, 3), "uint8")
        count, buffer = 0, []

        def flush() -> None:
            nonlocal count, buffer
            if buffer:
                array.resize((count + len(buffer), height, width, 3))
                array[count : count + len(buffer)] = np.stack(buffer)
                count += len(buffer)
                buffer = []

        expected = self.selection.max_frames or self.info.frames or 0
        with log.progress("extract", expected, "frames") as bar:
            for frame in self.selection.select(iter_source(self.info)):
                buffer.append(resize_cover(frame, width, height))
                bar.advance()
                if len(buffer) == chunk:
                    flush()
            flush()
        if count == 0:
            raise BadInput(f"no frames selected from {self.source} (check --start/--end)")
        out_fps = self.selection.output_fps(self.info.fps)
        summary = {"frames": count, "width": width, "height": height, "fps": str(out_fps),
                   "fps_float": float(out_fps), "source": self.info.as_dict()}
        array.attrs.update(summary)
        log.info(f"extract: {count} frames {width}x{height} at {float(out_fps):.3g} fps -> {self.run.path / ARRAY}")
        return summary

    def report(self, summary: dict) -> dict:
        return summary


def extract(project: Project, source: Path, size: tuple[int, int] | None, short_side: int | None,
            selection: Selection, chunk_frames: int, force: bool = False) -> dict:
    return drive(Extract(project, source, size, short_side, selection, chunk_frames, force))
