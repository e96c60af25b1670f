"""`vfx depth`: frames -> depth/depth.zarr, the depth maps a depth-conditioned UNet reads ([N, 1, h, w] at
the latent grid, each frame scaled to [-1, 1]; vfx/diffusion/depth.py), sharded by chunks of frames."""

from __future__ import annotations

from vfx.diffusion.depth import depth_maps, load_depth_model, resolve_depth_model
from vfx.driver import Stage, drive
from vfx.errors import BadInput
from vfx.settings import Settings
from vfx.stage import Part, StageRun, upstream
from vfx.stages.encode import VAE_FACTOR
from vfx.store import chunk_ranges, create_array, open_array

FOLDER = "depth"
ARRAY = "depth.zarr"


class Depth(Stage):
    label = "depth"

    def __init__(self, settings: Settings, depth_model: str | None, batch_size: int):
        if batch_size < 1:
            raise BadInput(f"invalid --batch-size {batch_size}: must be at least 1")
        self.settings, self.batch_size = settings, batch_size
        self.model = resolve_depth_model(settings.model, depth_model)
        source = upstream(settings.project, "extract", "frames.zarr")
        self.frames = open_array(settings.folder("frames", "frames.zarr"))
        self.ranges = chunk_ranges(self.frames.shape[0], self.frames.chunks[0])
        self.run = StageRun(settings.folder(FOLDER), "depth", {"depth_model": self.model.identity}, source.input(),
                            len(self.ranges), force=settings.force, shard=settings.shard)

    def prepare(self) -> None:
        self.estimator, self.processor = load_depth_model(self.model, self.settings.device)

    def create(self) -> None:
        count, height, width, _ = self.frames.shape
        shape = (1, height // VAE_FACTOR, width // VAE_FACTOR)
        create_array(self.run.path / ARRAY, (count, *shape), (self.frames.chunks[0], *shape), "float32",
                     {"kind": "depth", "depth_model": self.model.identity, "range": [-1, 1],
                      "meaning": "relative depth per frame, at the latent grid (larger: nearer, as DPT predicts)"})

    def do_unit(self, unit: int, bar) -> None:
        start, end = self.ranges[unit]
        out = open_array(self.run.path / ARRAY, mode="r+")
        for first in range(start, end, self.batch_size):
            last = min(first + self.batch_size, end)
            out[first:last] = depth_maps(self.estimator, self.processor, self.frames[first:last], self.settings.device,
                                         VAE_FACTOR)

    def parts(self, unit: int) -> list[Part]:
        return [Part(ARRAY, *self.ranges[unit])]

    def finalize(self) -> dict:
        return {"frames": self.frames.shape[0], "depth_model": self.model.identity}


def depth_input(settings: Settings, count: int, h: int, w: int) -> tuple[dict, object | None]:
    """For a depth model: (the depth stage's input record, its depth array), checked against `count`
    latents of h x w; for any other model ({}, None). Missing depth names `vfx depth`."""
    if settings.family != "depth":
        return {}, None
    depth = upstream(settings.project, "depth", ARRAY)
    array = open_array(depth.folder / ARRAY)
    if tuple(array.shape) != (count, 1, h, w):
        raise BadInput(f"{depth.folder / ARRAY} holds {tuple(array.shape)} depth maps, not the {(count, 1, h, w)} "
                       f"of these latents: rerun `vfx depth {settings.project.root} --force`")
    return depth.input(), array


def compute_depth(settings: Settings, depth_model: str | None = None, batch_size: int = 4) -> dict:
    return drive(Depth(settings, depth_model, batch_size))
