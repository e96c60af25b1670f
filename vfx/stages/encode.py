"""`vfx encode`: frames -> latents/latents.zarr (VAE posterior mean x scaling factor, [N, 4, h, w])."""

from __future__ import annotations

import numpy as np
import torch

from vfx.errors import BadInput
from vfx.stage import Part, StageRun, upstream
from vfx.stages.common import Settings, outcome, run_units, up_to_date_result
from vfx.store import chunk_ranges, create_array, open_array

FOLDER = "latents"
ARRAY = "latents.zarr"


def frames_to_tensor(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float32 [n, 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


@torch.no_grad()
def encode_frames(vae, frames: np.ndarray, device: torch.device, batch_size: int) -> np.ndarray:
    scale = float(vae.config.scaling_factor)
    out = []
    for start in range(0, len(frames), batch_size):
        x = frames_to_tensor(frames[start : start + batch_size], device)
        out.append((vae.encode(x).latent_dist.mean * scale).float().cpu().numpy())
    return np.concatenate(out)


def encode(settings: Settings, batch_size: int = 4) -> dict:
    if batch_size < 1:
        raise BadInput(f"invalid --batch-size {batch_size}: must be at least 1")
    frames_record = upstream(settings.project, "frames", "extract", "vfx extract {dir} --video FILE")
    frames = open_array(settings.folder("frames", "frames.zarr"))
    count, height, width, _ = frames.shape
    chunk = frames.chunks[0]
    ranges = chunk_ranges(count, chunk)
    params = {"model": settings.model.identity}
    run = StageRun(
        settings.folder(FOLDER), "encode", params, {"frames": frames_record["fingerprint"]}, len(ranges),
        force=settings.force, shard=settings.shard,
    )
    if run.up_to_date() and not settings.force:
        return up_to_date_result(run)

    def create() -> None:
        create_array(
            run.path / ARRAY, (count, 4, height // 8, width // 8), (chunk, 4, height // 8, width // 8), "float32",
            {"kind": "latents", "model": settings.model.identity, "fps": frames.attrs.get("fps"),
             "scaling_factor_applied": True},
        )

    pending = run.start(create)
    latents = open_array(run.path / ARRAY, mode="r+")

    def work(unit: int, bar) -> list[np.ndarray]:
        start, end = ranges[unit]
        vae = settings.pipeline().vae
        result = encode_frames(vae, frames[start:end], settings.device, batch_size)
        latents[start:end] = result
        return [result]

    def parts(unit: int) -> list[Part]:
        return [Part(ARRAY, *ranges[unit])]

    computed = run_units(run, pending, work, "encode", on_start=settings.pipeline, parts=parts)
    return outcome(run, run.finish(), computed)
