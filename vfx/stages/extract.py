"""`vfx extract`: a video or image folder -> frames/frames.zarr (uint8 [N, H, W, 3]) and, when the video
has sound, frames/audio.m4a (AAC: the audio of the selected frames, from the first one's time on, as
long as they last at the output fps).

Decoding is sequential, so extract is one unit of work: it streams frames into a scratch array
chunk by chunk (never holding the video in memory) and swaps it in only when complete, so a
failure leaves any earlier frames untouched. Audio is kept only when the frames keep the source's
timing: with `--stride` above 1 or an `--fps` other than the source's, it would no longer be in sync,
so it is left out with a note.
"""

from __future__ import annotations

import hashlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from vfx import log
from vfx.driver import SingleUnitStage, drive
from vfx.errors import BadInput
from vfx.media import AUTO, Selection, iter_source, keep_audio, probe, resize_frame, target_size
from vfx.project import Project
from vfx.stage import StageRun
from vfx.store import create_array

FOLDER = "frames"
ARRAY = "frames.zarr"
AUDIO = "audio.m4a"


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

    def __init__(self, project: Project, source: Path, size: tuple[int, int] | str | None, short_side: int | None,
                 fit: str, selection: Selection, chunk_frames: int, force: bool):
        selection.validate()
        if chunk_frames < 1:
            raise BadInput(f"invalid chunk size {chunk_frames}: must be at least 1")
        self.source, self.selection, self.chunk_frames, self.fit = source, selection, chunk_frames, fit
        self.info = info = probe(source)
        upright = info.rotation % 180 == 0
        native = model_native_size(project) if short_side is None and size in (None, AUTO) else 512
        self.width, self.height = target_size(info.width if upright else info.height,
                                              info.height if upright else info.width, size, short_side, fit, native)
        if self.width < 8 or self.height < 8:
            raise BadInput(f"{source} is {info.width}x{info.height}: too small for a multiple-of-8 frame")
        params = {
            "source": str(Path(source).resolve()), "source_id": source_identity(source),
            "size": [self.width, self.height], "start": selection.start, "end": selection.end,
            "stride": selection.stride, "fps": selection.fps, "max_frames": selection.max_frames,
            "chunk_frames": chunk_frames,
        }
        if fit != "cover":  # recorded only when not the original policy, so older projects stay complete
            params["fit"] = fit
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
        first_time = None
        with log.progress("extract", expected, "frames") as bar:
            timed = ((index, time, (time, frame)) for index, time, frame in iter_source(self.info))
            for time, frame in self.selection.select(timed):
                first_time = time if first_time is None else first_time
                buffer.append(resize_frame(frame, width, height, self.fit))
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
        summary["audio"] = self.audio(scratch / AUDIO, first_time, count / out_fps, out_fps)
        log.info(f"extract: {count} frames {width}x{height} at {float(out_fps):.3g} fps -> {self.run.path / ARRAY}")
        return summary

    def audio(self, out: Path, start: float, seconds: Fraction, out_fps: Fraction) -> dict | None:
        """The source's audio over the selected frames, when it stays in sync with them."""
        if not self.info.has_audio:
            return None
        if out_fps != self.info.fps:
            change = f"--stride {self.selection.stride}" if self.selection.fps is None else f"--fps {self.selection.fps:g}"
            log.note(f"extract: the audio is not kept: {change} changes the video's timing "
                     f"({float(self.info.fps):.3g} -> {float(out_fps):.3g} fps), so it would no longer be in sync")
            return None
        try:
            return keep_audio(self.source, out, start, seconds)
        except av.FFmpegError as exc:
            out.unlink(missing_ok=True)
            log.warn(f"extract: the audio of {self.source} is not kept: it could not be decoded or encoded ({exc})")
            return None

    def complete(self, summary: dict, started: float, swap_in) -> None:
        def swap_in_and_drop_old_audio() -> None:
            swap_in()
            if not summary.get("audio"):
                (self.run.path / AUDIO).unlink(missing_ok=True)

        super().complete(summary, started, swap_in_and_drop_old_audio)

    def report(self, summary: dict) -> dict:
        return summary


def model_native_size(project: Project) -> int:
    """The project model's native side (512 for SD 1.5); 512 when its configs cannot be read."""
    from vfx.models import native_size, resolve_model

    try:
        native = native_size(resolve_model(project.config["model"]))
    except BadInput:
        native = None
    if native is None:
        log.note(f"extract: the native size of model {project.config['model']!r} cannot be read from its configs; "
                 "the short side is at most 512 (pass --size or --short-side to choose)")
    return native or 512


def extract(project: Project, source: Path, size: tuple[int, int] | str | None, short_side: int | None,
            fit: str, selection: Selection, chunk_frames: int, force: bool = False) -> dict:
    return drive(Extract(project, source, size, short_side, fit, selection, chunk_frames, force))
