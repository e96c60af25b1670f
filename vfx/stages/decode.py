"""`vfx decode`: latents (the source's or an edit's) -> decoded/<name>/ frames and an H.264 video.

Frame decoding is sharded by chunk; the video is written by whichever process completes the
last chunk, once every frame is present, at the source's frame rate.
"""

from __future__ import annotations

import shutil
from fractions import Fraction

import numpy as np
import torch
from PIL import Image

from vfx import log
from vfx.errors import BadInput
from vfx.media import write_mp4
from vfx.project import validate_name
from vfx.stage import Part, StageRun, upstream
from vfx.stages.common import Settings, outcome, run_units, up_to_date_result
from vfx.store import chunk_ranges, create_array, open_array

SOURCE_NAME = "source"


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


def source_of(settings: Settings, edit: str | None) -> tuple[str, str, dict, str]:
    """(output name, latents array path, upstream record, upstream folder) for decode."""
    if edit is None:
        record = upstream(settings.project, "latents", "encode", "vfx encode {dir}")
        return SOURCE_NAME, "latents/latents.zarr", record, "latents"
    validate_name(edit, "edit name")
    if edit == SOURCE_NAME:
        raise BadInput(f"'{SOURCE_NAME}' is reserved for the source latents; omit --edit to decode them")
    record = upstream(settings.project, f"edits/{edit}", f"edit '{edit}'", "vfx edit {dir} --name " + edit + " --prompt ...")
    return edit, f"edits/{edit}/latents.zarr", record, f"edits/{edit}"


def decode(settings: Settings, edit: str | None = None, batch_size: int = 4, png: bool = False) -> dict:
    if batch_size < 1:
        raise BadInput(f"invalid --batch-size {batch_size}: must be at least 1")
    name, latents_path, record, upstream_folder = source_of(settings, edit)
    latents = open_array(settings.folder(*latents_path.split("/")))
    frames_record = upstream(settings.project, "frames", "extract", "vfx extract {dir} --video FILE")
    fps = Fraction(frames_record["summary"]["fps"])
    count, _, h, w = latents.shape
    chunk = latents.chunks[0]
    ranges = chunk_ranges(count, chunk)
    params = {"model": settings.model.identity, "png": png}
    folder = settings.folder("decoded", name)
    run = StageRun(folder, "decode", params, {upstream_folder: record["fingerprint"]}, len(ranges),
                   force=settings.force, shard=settings.shard)
    if run.up_to_date() and not settings.force:
        return up_to_date_result(run, {"video": str(folder / "video.mp4")})

    def create() -> None:
        shutil.rmtree(folder / "png", ignore_errors=True)
        (folder / "video.mp4").unlink(missing_ok=True)
        create_array(folder / "frames.zarr", (count, h * 8, w * 8, 3), (chunk, h * 8, w * 8, 3), "uint8",
                     {"kind": "frames", "fps": str(fps), "decoded_from": upstream_folder})

    pending = run.start(create)
    frames = open_array(folder / "frames.zarr", mode="r+")

    def work(unit: int, bar) -> list[np.ndarray]:
        start, end = ranges[unit]
        result = decode_latents(settings.pipeline().vae, latents[start:end], settings.device, batch_size)
        frames[start:end] = result
        return [result]

    def finalize() -> dict:
        def stream():
            for start, end in ranges:
                yield from frames[start:end]

        with log.err.status("writing video"):
            written = write_mp4(folder / "video.mp4", stream(), fps)
        if png:
            png_dir = folder / "png"
            png_dir.mkdir(exist_ok=True)
            for index, frame in enumerate(stream()):
                Image.fromarray(frame).save(png_dir / f"{index:05d}.png")
        return {"frames": written, "fps": str(fps), "video": str(folder / "video.mp4")}

    def parts(unit: int) -> list[Part]:
        return [Part("frames.zarr", *ranges[unit])]

    computed = run_units(run, pending, work, f"decode {name}", on_start=settings.pipeline, parts=parts)
    complete = run.finish(finalize)
    if complete:
        log.info(f"decode: {count} frames -> {folder / 'video.mp4'}")
    return outcome(run, complete, computed, {"video": str(folder / "video.mp4") if complete else None})
