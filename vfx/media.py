"""Reading videos and image folders (PyAV, Pillow), the resize policy, and writing H.264 video.

Resize policy (`extract`): by default (`--size auto`) the frame keeps its aspect ratio, its short side
the model's native size, or the source's own when that is smaller (never upscaled). `--size WxH`
chooses the frame with `--fit`: `cover` scales to cover WxH and crops the centre, `contain` scales
to fit inside WxH (the frame keeps its aspect ratio, so one side may come out smaller), `stretch`
resizes to exactly WxH. `--short-side S` scales the short side to S. Output sides are always
multiples of 8 (the VAE's downsampling factor): the long side is rounded to the nearest one and the
few pixels between are cropped (or stretched, with `--fit stretch`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import av
import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vfx.errors import BadInput
from vfx.fsutil import regular_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
MAX_SIDE = 4096  # largest output side accepted; beyond it SD's attention does not fit anyway
# Files that often sit beside photos and are not meant as images (no warning for them).
IGNORED_SUFFIXES = {".txt", ".md", ".json", ".jsonl", ".csv", ".toml", ".yaml", ".yml", ".lock"}
FOLDER_FPS = Fraction(24)  # frame rate assumed for a folder of images unless --fps says otherwise


# ---------------------------------------------------------------- sizes

FITS = ("cover", "contain", "stretch")
AUTO = "auto"


def parse_size(text: str) -> tuple[int, int] | str:
    """`WxH` (each side a positive multiple of 8), or "auto": the source's aspect ratio kept."""
    if (text or "").strip().lower() == AUTO:
        return AUTO
    match = re.fullmatch(r"\s*(-?\d+)\s*[xX]\s*(-?\d+)\s*", text or "")
    if not match:
        raise BadInput(f"invalid size {text!r}: expected WxH, e.g. 512x512, or auto")
    width, height = int(match.group(1)), int(match.group(2))
    for side in (width, height):
        if side <= 0 or side % 8 or side > MAX_SIDE:
            raise BadInput(f"invalid size {text!r}: each side must be a positive multiple of 8, at most {MAX_SIDE}")
    return width, height


def _multiple_of_8(side: float) -> int:
    return max(8, int(side / 8 + 0.5) * 8)  # to the nearest multiple, halves up


def target_size(src_w: int, src_h: int, size: tuple[int, int] | str | None, short_side: int | None,
                fit: str = "cover", native: int = 512) -> tuple[int, int]:
    """The output frame size for a `src_w` x `src_h` source (see the module's resize policy)."""
    if fit not in FITS:
        raise BadInput(f"invalid --fit {fit!r}: use one of {', '.join(FITS)}")
    if short_side is not None:
        if not 8 <= short_side <= MAX_SIDE:
            raise BadInput(f"invalid --short-side {short_side}: must be between 8 and {MAX_SIDE}")
        scale = short_side / min(src_w, src_h)
        width, height = (round(src_w * scale) // 8) * 8, (round(src_h * scale) // 8) * 8
    elif size is None or size == AUTO:
        short = min(native, max(8, min(src_w, src_h) // 8 * 8))
        scale = short / min(src_w, src_h)
        width, height = _multiple_of_8(src_w * scale), _multiple_of_8(src_h * scale)
    elif fit == "contain":
        box_w, box_h = size
        scale = min(box_w / src_w, box_h / src_h)
        width, height = min(box_w, _multiple_of_8(src_w * scale)), min(box_h, _multiple_of_8(src_h * scale))
    else:
        width, height = size
    if max(width, height) > MAX_SIDE:
        raise BadInput(f"a {src_w}x{src_h} source makes a {width}x{height} frame, over the {MAX_SIDE} limit; "
                       "pass a smaller --size or --short-side")
    return width, height


def resize_frame(frame: np.ndarray, width: int, height: int, fit: str = "cover") -> np.ndarray:
    """`frame` at width x height: stretched with `fit="stretch"`, else scaled to cover it, keeping the
    aspect ratio, with the centre cropped (for `contain` and the default size, only the rounding to
    multiples of 8 is cropped: the frame size already has the source's aspect ratio)."""
    src_h, src_w = frame.shape[:2]
    if (src_w, src_h) == (width, height):
        return np.ascontiguousarray(frame)
    if fit == "stretch":
        interp = cv2.INTER_AREA if width * height < src_w * src_h else cv2.INTER_CUBIC
        return np.ascontiguousarray(cv2.resize(frame, (width, height), interpolation=interp))
    scale = max(width / src_w, height / src_h)
    new_w, new_h = max(width, round(src_w * scale)), max(height, round(src_h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(frame, (new_w, new_h), interpolation=interp)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return np.ascontiguousarray(resized[top : top + height, left : left + width])


def apply_rotation(frame: np.ndarray, rotation: float) -> np.ndarray:
    """Undo a display-matrix rotation (counter-clockwise degrees, as FFmpeg reports it)."""
    turns = int(round(rotation / 90)) % 4
    return np.ascontiguousarray(np.rot90(frame, k=turns)) if turns else frame


# ---------------------------------------------------------------- selection


def parse_position(text: str | None) -> tuple[str, float] | None:
    """`12` (a frame index) or `1.5s` (seconds)."""
    if text is None or text == "":
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s?)\s*", text)
    if not match or (not match.group(2) and "." in match.group(1)):
        raise BadInput(f"invalid position {text!r}: use a frame index (30) or seconds (1.5s)")
    return ("seconds", float(match.group(1))) if match.group(2) else ("frame", float(match.group(1)))


@dataclass
class Selection:
    start: tuple[str, float] | None = None
    end: tuple[str, float] | None = None
    stride: int = 1
    fps: float | None = None
    max_frames: int = 0

    def validate(self) -> None:
        if self.stride < 1:
            raise BadInput(f"invalid --stride {self.stride}: must be at least 1")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise BadInput(f"invalid --fps {self.fps}: must be a positive number")
        if self.fps is not None and self.stride != 1:
            raise BadInput("--fps and --stride cannot be combined; pick one")
        if self.max_frames < 0:
            raise BadInput(f"invalid --max-frames {self.max_frames}: must be 0 (all) or more")

    def output_fps(self, source_fps: Fraction) -> Fraction:
        if self.fps is not None:
            return Fraction(self.fps).limit_denominator(1001)
        return source_fps / self.stride

    def select(self, frames: Iterable[tuple[int, float, np.ndarray]]) -> Iterator[np.ndarray]:
        """Keep the frames in [start, end), every stride-th or resampled to fps, at most max_frames."""
        kept, next_time, first_time = 0, None, None
        for index, time, frame in frames:
            position = {"frame": index, "seconds": time}
            if self.start and position[self.start[0]] < self.start[1]:
                continue
            if self.end and position[self.end[0]] >= self.end[1]:
                return
            if first_time is None:
                first_time = time
                next_time = time
                offset = index
            if self.fps is not None:
                if time + 1e-6 < next_time:
                    continue
                next_time += 1.0 / self.fps
            elif (index - offset) % self.stride:
                continue
            yield frame
            kept += 1
            if self.max_frames and kept >= self.max_frames:
                return


# ---------------------------------------------------------------- sources


@dataclass
class SourceInfo:
    path: str
    kind: str  # video | images
    width: int
    height: int
    fps: Fraction
    frames: int  # declared count (0 when unknown)
    has_audio: bool
    rotation: float = 0.0
    codec: str = ""

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "kind": self.kind,
            "width": self.width,
            "height": self.height,
            "fps": str(self.fps),
            "declared_frames": self.frames,
            "has_audio": self.has_audio,
            "rotation": self.rotation,
            "codec": self.codec,
        }


def image_files(folder: Path) -> list[Path]:
    """The image files of a folder (by suffix, hidden files skipped), sorted by name.

    Other files are named in a warning rather than skipped silently: a photo in a format vfx does not
    know should not vanish from a training set without a word.
    """
    entries = [p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")]
    images = sorted(p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES)
    others = sorted(p.name for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES | IGNORED_SUFFIXES)
    if others:
        from vfx import log

        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        log.warn(f"{folder}: not reading {len(others)} file(s) that are not images "
                 f"({', '.join(sorted(IMAGE_SUFFIXES))}): {shown}")
    return images


def _register_heif() -> None:
    """HEIC/HEIF (the iPhone default) and AVIF through pillow-heif, when it is installed."""
    try:
        import pillow_heif
    except ImportError:
        return
    pillow_heif.register_heif_opener()


_register_heif()


def read_image(path: Path) -> np.ndarray:
    """An RGB uint8 array from any image mode Pillow reads (palette, grey, alpha, 16-bit), turned upright
    by its EXIF orientation (a portrait phone photo is stored sideways with orientation 6 or 8)."""
    regular_file(path, "image")
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
                array = np.asarray(image, dtype=np.float64)
                array = (array / max(array.max(), 1) * 255).astype(np.uint8)
                return np.ascontiguousarray(np.stack([array] * 3, axis=-1))
            return np.ascontiguousarray(np.asarray(image.convert("RGB")))
    except Image.DecompressionBombError:
        raise BadInput(f"{path} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadInput(f"{path} is not a readable image: {exc}") from None


def probe(path: Path) -> SourceInfo:
    """Open a video or image folder and check it has frames; raises BadInput otherwise."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file or folder")
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise BadInput(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        first = read_image(files[0])
        return SourceInfo(str(path), "images", first.shape[1], first.shape[0], FOLDER_FPS, len(files), False)
    regular_file(path, "video")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadInput(f"{path} has no video stream")
            stream = container.streams.video[0]
            fps = stream.average_rate or stream.guessed_rate or Fraction(24)
            first = next(container.decode(stream), None)
            if first is None:
                raise BadInput(f"{path} has no decodable video frames")
            rotation = float(getattr(first, "rotation", 0) or 0)
            return SourceInfo(
                str(path),
                "video",
                first.width,
                first.height,
                Fraction(fps),
                int(stream.frames or 0),
                bool(container.streams.audio),
                rotation,
                stream.codec_context.name,
            )
    except av.FFmpegError as exc:
        raise BadInput(f"{path} is not a readable video: {exc}") from None
    except StopIteration:
        raise BadInput(f"{path} has no decodable video frames") from None


def iter_source(info: SourceInfo) -> Iterator[tuple[int, float, np.ndarray]]:
    """(index, time in seconds, RGB frame) for every frame, rotation applied; streams from disk."""
    if info.kind == "images":
        for index, file in enumerate(image_files(Path(info.path))):
            frame = read_image(file)
            yield index, float(index / info.fps), frame
        return
    decoded = 0
    try:
        with av.open(info.path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for index, frame in enumerate(container.decode(stream)):
                time = float(frame.time) if frame.time is not None else index / float(info.fps)
                array = frame.to_ndarray(format="rgb24")
                decoded += 1
                yield index, time, apply_rotation(array, info.rotation)
    except av.FFmpegError as exc:
        raise BadInput(f"{info.path} could not be decoded after {decoded} frames (truncated or corrupt?): {exc}") from None
    if info.frames and decoded < info.frames:
        raise BadInput(f"{info.path} is truncated: it declares {info.frames} frames but only {decoded} decode")


# ---------------------------------------------------------------- writing


def write_mp4(path: Path, frames: Iterable[np.ndarray], fps: Fraction, crf: int = 18,
              audio: Path | None = None) -> int:
    """H.264 in yuv420p (browser-playable) at `fps`; written to a temporary name, then renamed. With
    `audio` (an .m4a from `keep_audio`), its AAC stream is copied in beside the video, both starting at
    time 0, interleaved by time."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.mp4")
    count = 0
    try:
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "faststart"}) as container, \
                contextlib.ExitStack() as stack:
            stream = sound = None
            for frame in frames:
                if stream is None:
                    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                    stream.height, stream.width = frame.shape[:2]
                    stream.pix_fmt = "yuv420p"
                    # No macroblock-tree rate control: with it, libx264 read memory it had not written
                    # (the same frames encoded to one of five byte streams, by the heap's state).
                    stream.options = {"crf": str(crf), "preset": "medium", "x264-params": "mbtree=0"}
                    if audio is not None:
                        sound = stack.enter_context(_CopiedAudio(container, audio))
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
                count += 1
                if sound is not None:
                    sound.mux_until(count / Fraction(fps))
            if stream is not None:
                container.mux(stream.encode())
            if sound is not None:
                sound.mux_until(None)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


# ---------------------------------------------------------------- audio

AUDIO_BIT_RATE = 192_000


def keep_audio(source: Path, out: Path, start: float, seconds: Fraction) -> dict | None:
    """The source's first audio stream over [start, start + seconds) of its timeline, re-encoded to AAC
    in an .m4a at `out`, cut to the sample (silence where the source has no sound). Returns the track's
    description, or None when the source has no audio stream."""
    with av.open(str(source)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        layout = stream.codec_context.layout.name
        first, total = round(start * rate), round(Fraction(seconds) * rate)
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        with av.open(str(out), "w", format="mp4") as dst:
            encoder = dst.add_stream("aac", rate=rate, layout=layout)
            encoder.bit_rate = AUDIO_BIT_RATE
            channels = len(encoder.layout.channels)
            written = 0

            def put(block: np.ndarray) -> None:
                nonlocal written
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block, dtype=np.float32), format="fltp",
                                                   layout=layout)
                frame.sample_rate, frame.pts = rate, written
                written += block.shape[1]
                dst.mux(encoder.encode(frame))

            def silence(until: int) -> None:
                while written < until:
                    put(np.zeros((channels, min(until - written, rate)), np.float32))

            position = None  # the source sample index (on its timeline) of the next decoded sample
            for decoded in container.decode(stream):
                if position is None:
                    position = round(decoded.time * rate) if decoded.time is not None else 0
                for frame in resampler.resample(decoded):
                    block = frame.to_ndarray()
                    low, position = position, position + block.shape[1]
                    silence(min(low, first + total) - first)  # a gap before this block
                    begin, stop = max(first + written, low) - low, min(position, first + total) - low
                    if stop > begin:
                        put(block[:, begin:stop])
                if written >= total:
                    break
            silence(total)
            dst.mux(encoder.encode(None))
    return {"file": Path(out).name, "codec": "aac", "sample_rate": rate, "channels": channels,
            "samples": total, "seconds": total / rate}


class _CopiedAudio:
    """The AAC stream of an .m4a, copied packet by packet into an output container."""

    def __init__(self, container: av.container.OutputContainer, path: Path):
        self.container, self.source = container, av.open(str(path))
        template = self.source.streams.audio[0]
        self.stream = container.add_stream_from_template(template)
        self.packets = (packet for packet in self.source.demux(template) if packet.dts is not None)
        self.next = next(self.packets, None)

    def mux_until(self, seconds: Fraction | None) -> None:
        """Mux the packets that start before `seconds` (every remaining one for None)."""
        while self.next is not None and (seconds is None or self.next.pts * self.next.time_base < seconds):
            self.next.stream = self.stream
            self.container.mux(self.next)
            self.next = next(self.packets, None)

    def __enter__(self) -> "_CopiedAudio":
        return self

    def __exit__(self, *exc) -> None:
        self.source.close()


def synthetic_video(path: Path, frames: int = 24, size: int = 128, fps: int = 12, seed: int = 0) -> Path:
    """A small generated clip (a textured disc moving over a gradient), for demos without sample data."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    background = np.stack([xx, yy, 1 - xx * yy], axis=-1)
    texture = rng.random((size // 8, size // 8, 3)).astype(np.float32)
    texture = cv2.resize(texture, (size, size), interpolation=cv2.INTER_CUBIC)
    clip = []
    for t in range(frames):
        cx, cy = 0.3 + 0.4 * t / max(frames - 1, 1), 0.5 + 0.15 * np.sin(t / 3)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < 0.04)[..., None]
        image = np.where(disc, texture, background * 0.8 + 0.2 * texture)
        clip.append((np.clip(image, 0, 1) * 255).astype(np.uint8))
    write_mp4(path, clip, Fraction(fps))
    return Path(path)
