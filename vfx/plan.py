"""Job-array sizing: how many units a shardable stage has, and which array indices still have work.

A stage's units are fixed by its upstream artifact (frame stages: the chunks of frames/frames.zarr;
DreamBooth stages: groups of --batch-size images), so they can be counted before the stage runs.
`vfx plan` turns that into the number of SLURM array tasks; `vfx status --missing` lists the
tasks whose units are not done, in the syntax `sbatch --array=` takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from vfx import graph
from vfx.errors import BadInput
from vfx.project import Project
from vfx.stage import Shard, StageFolder, is_complete, upstream
from vfx.store import open_array

SHARDABLE = graph.SHARDABLE


@dataclass(frozen=True)
class Request:
    """What a stage will be run with, as far as its unit count depends on it."""

    stage: str
    name: str | None = None  # decode: edit (default source); eval: edit or 'inversion'; regularize/sample: run
    chunk_frames: int | None = None  # a different chunk size than frames/ has (a re-extract)
    images: int | None = None  # regularize: --num-images; sample: prompts x --num-images
    batch_size: int = 4

    def __post_init__(self) -> None:
        for flag, value in (("--chunk-frames", self.chunk_frames), ("--images", self.images),
                            ("--batch-size", self.batch_size)):
            if value is not None and value < 1:
                raise BadInput(f"invalid {flag} {value}: must be at least 1")


def check_stage(stage: str) -> graph.StageSpec:
    if stage not in SHARDABLE:
        raise BadInput(f"unknown or unshardable stage {stage!r}: use one of {', '.join(SHARDABLE)}")
    return graph.spec(stage)


def stage_folder(project: Project, request: Request) -> Path:
    """The stage's output folder inside the project."""
    row = check_stage(request.stage)
    if row.named and not (request.name or row.default_name):
        raise BadInput(f"{request.stage} needs --name (the DreamBooth run)")
    return project.path(*row.folder_for(request.name).split("/"))


def recorded_units(folder: Path) -> int | None:
    """The unit count in the stage's record, when it has run (or started)."""
    rec = StageFolder(folder).record()
    return int(rec["units"]) if rec and isinstance(rec.get("units"), int) else None


def count_units(project: Project, request: Request) -> int:
    """The number of units the stage will have, from its upstream artifact (or the request)."""
    row = check_stage(request.stage)
    if row.unit == "image":
        if not request.images or request.images < 1 or request.batch_size < 1:
            raise BadInput(f"{row.stage} units are groups of --batch-size images: give --images N (and --batch-size)")
        return math.ceil(request.images / request.batch_size)
    frames = upstream(project, "extract", "frames.zarr")
    array = open_array(frames.folder / "frames.zarr")
    chunk = array.chunks[0] if request.chunk_frames is None else request.chunk_frames
    if chunk < 1:
        raise BadInput("--chunk-frames must be at least 1")
    items = array.shape[0] - (1 if row.unit == "pair" else 0)
    return math.ceil(max(items, 0) / chunk)


def shard_count(units: int, per_shard: int = 1) -> int:
    """Array tasks to request so each gets about `per_shard` units."""
    if per_shard < 1:
        raise BadInput("--per-shard must be at least 1")
    return max(1, math.ceil(units / per_shard))


def missing_shards(folder: Path, units: int, shards: int, verify: bool = False) -> list[int]:
    """Shard indices (of `shards`) owning a unit not done (or, with `verify`, damaged)."""
    if shards < 1:
        raise BadInput("--shards must be at least 1")
    sf = StageFolder(folder)
    complete = is_complete(sf.record())
    # A complete record vouches for every unit, unless verifying (then each marker must be there).
    done = set(range(units)) if complete and not verify else sf.done_units()
    damaged = set(sf.damaged_units(done)) if verify else set()
    missing = []
    for index in range(shards):
        owned = Shard(index, shards).units(units)
        if any(unit not in done or unit in damaged for unit in owned):
            missing.append(index)
    return missing


def array_spec(indices: list[int]) -> str:
    """Indices as `sbatch --array=` syntax: runs collapsed, e.g. [0,1,2,3,7,9,10,11] -> '0-3,7,9-11'."""
    runs: list[list[int]] = []
    for index in sorted(set(indices)):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
