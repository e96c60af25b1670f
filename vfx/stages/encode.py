"""`vfx encode`: frames -> latents/latents.zarr (VAE posterior mean x scaling factor, [N, 4, h, w])."""

from __future__ import annotations

import numpy as np
import torch

from vfx.driver import Stage, drive
from vfx.errors import BadInput
from vfx.settings import Settings
from vfx.stage import Part, StageRun, upstream
from vfx.store import chunk_ranges, create_array, open_array

FOLDER = "latents"
ARRAY = "latents.zarr"
VAE_FACTOR = 8  # pixels per latent along each side, in every SD family's VAE


def pixel_size(latent_shape: tuple[int, ...]) -> tuple[int, int]:
    """(height, width) of the frames that latents of `latent_shape` (..., h, w) decode to."""
    return VAE_FACTOR * latent_shape[-2], VAE_FACTOR * latent_shape[-1]


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


class Encode(Stage):
    label = "encode"

    def __init__(self, settings: Settings, batch_size: int):
        if batch_size < 1:
            raise BadInput(f"invalid --batch-size {batch_size}: must be at least 1")
        self.settings, self.batch_size = settings, batch_size
        source = upstream(settings.project, "extract", "frames.zarr")
        self.frames = open_array(settings.folder("frames", "frames.zarr"))
        self.ranges = chunk_ranges(self.frames.shape[0], self.frames.chunks[0])
        self.run = StageRun(settings.folder(FOLDER), "encode", {"model": settings.model.identity}, source.input(),
                            len(self.ranges), force=settings.force, shard=settings.shard)

    def prepare(self) -> None:
        self.vae = self.settings.vae()

    def create(self) -> None:
        count, height, width, _ = self.frames.shape
        chunk = self.frames.chunks[0]
        create_array(
            self.run.path / ARRAY, (count, 4, height // 8, width // 8), (chunk, 4, height // 8, width // 8), "float32",
            {"kind": "latents", "model": self.settings.model.identity, "fps": self.frames.attrs.get("fps"),
             "scaling_factor_applied": True},
        )

    def do_unit(self, unit: int, bar) -> None:
        start, end = self.ranges[unit]
        latents = open_array(self.run.path / ARRAY, mode="r+")
        latents[start:end] = encode_frames(self.vae, self.frames[start:end], self.settings.device, self.batch_size)

    def parts(self, unit: int) -> list[Part]:
        return [Part(ARRAY, *self.ranges[unit])]


def encode(settings: Settings, batch_size: int = 4) -> dict:
    return drive(Encode(settings, batch_size))
