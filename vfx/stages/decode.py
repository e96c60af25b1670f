"""`vfx decode`: latents (the source's or an edit's) -> decoded/<name>/ frames and an H.264 video.

Frame decoding is sharded by chunk; the video is written by whichever process completes the
last chunk, once every frame is present, at the source's frame rate. When extract kept the source's
audio (frames/audio.m4a), it is copied into the video, starting with the first frame.
"""

from __future__ import annotations

import shutil
from fractions import Fraction

import numpy as np
import torch
from PIL import Image

from vfx import graph, log
from vfx.driver import Stage, drive
from vfx.errors import BadInput
from vfx.media import write_mp4
from vfx.project import validate_name
from vfx.settings import Settings
from vfx.stages.extract import AUDIO
from vfx.stage import Part, StageRun, Upstream, upstream
from vfx.store import chunk_ranges, create_array, open_array

SOURCE_NAME = graph.spec("decode").default_name  # decoded/source: the VAE round trip of the source


@torch.no_grad()
def decode_latents(vae, latents: np.ndarray, device: torch.device, batch_size: int) -> np.ndarray:
    """float latents [n, 4, h, w] (scaled) -> uint8 frames [n, H, W, 3]."""
    scale = float(vae.config.scaling_factor)
    out = []
    for start in range(0, len(latents), batch_size):
        z = torch.from_numpy(np.ascontiguousarray(latents[start : start + batch_size])).to(device, torch.float32)
        image = vae.decode(z / scale).sample
        image = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        out.append(image.permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def source_of(settings: Settings, edit: str | None) -> tuple[str, Upstream]:
    """(output name, the latents artifact to decode): the source's latents, or an edit's."""
    if edit is None:
        return SOURCE_NAME, upstream(settings.project, "encode", "latents.zarr")
    validate_name(edit, "edit name")
    if edit == SOURCE_NAME:
        raise BadInput(f"'{SOURCE_NAME}' is reserved for the source latents; omit --edit to decode them")
    return edit, upstream(settings.project, "edit", "latents.zarr", edit)


class Decode(Stage):
    def __init__(self, settings: Settings, edit: str | None, batch_size: int, png: bool):
        if batch_size < 1:
            raise BadInput(f"invalid --batch-size {batch_size}: must be at least 1")
        self.settings, self.batch_size, self.png = settings, batch_size, png
        self.name, source = source_of(settings, edit)
        self.label = f"decode {self.name}"
        self.source_folder = str(source.folder.relative_to(settings.project.root))
        self.latents = open_array(source.folder / "latents.zarr")
        frames = upstream(settings.project, "extract", "frames.zarr")
        self.fps = Fraction(frames.record["summary"]["fps"])
        inputs = source.input()
        self.audio = None
        if frames.record["summary"].get("audio"):
            audio = upstream(settings.project, "extract", AUDIO)
            self.audio = audio.folder / AUDIO
            inputs.update(audio.input())
        self.ranges = chunk_ranges(self.latents.shape[0], self.latents.chunks[0])
        self.folder = settings.folder("decoded", self.name)
        params = {"model": settings.model.identity, "png": png}
        self.run = StageRun(self.folder, "decode", params, inputs, len(self.ranges),
                            force=settings.force, shard=settings.shard)

    def prepare(self) -> None:
        self.vae = self.settings.vae()

    def create(self) -> None:
        count, _, h, w = self.latents.shape
        shutil.rmtree(self.folder / "png", ignore_errors=True)
        (self.folder / "video.mp4").unlink(missing_ok=True)
        create_array(self.folder / "frames.zarr", (count, h * 8, w * 8, 3), (self.latents.chunks[0], h * 8, w * 8, 3),
                     "uint8", {"kind": "frames", "fps": str(self.fps), "decoded_from": self.source_folder})

    def do_unit(self, unit: int, bar) -> None:
        start, end = self.ranges[unit]
        frames = open_array(self.folder / "frames.zarr", mode="r+")
        frames[start:end] = decode_latents(self.vae, self.latents[start:end], self.settings.device, self.batch_size)

    def parts(self, unit: int) -> list[Part]:
        return [Part("frames.zarr", *self.ranges[unit])]

    def stream(self):
        frames = open_array(self.folder / "frames.zarr")
        for start, end in self.ranges:
            yield from frames[start:end]

    def finalize(self) -> dict:
        with log.err.status("writing video"):
            written = write_mp4(self.folder / "video.mp4", self.stream(), self.fps, audio=self.audio)
        if self.png:
            png_dir = self.folder / "png"
            png_dir.mkdir(exist_ok=True)
            for index, frame in enumerate(self.stream()):
                Image.fromarray(frame).save(png_dir / f"{index:05d}.png")
        log.info(f"decode: {written} frames -> {self.folder / 'video.mp4'}")
        summary = {"frames": written, "fps": str(self.fps), "video": str(self.folder / "video.mp4")}
        return {**summary, "audio": True} if self.audio else summary

    def report(self, summary: dict) -> dict:
        return {"video": str(self.folder / "video.mp4") if summary else None}


def decode(settings: Settings, edit: str | None = None, batch_size: int = 4, png: bool = False) -> dict:
    return drive(Decode(settings, edit, batch_size, png))
