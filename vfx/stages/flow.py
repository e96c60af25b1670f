"""`vfx flow`: frames -> flow/ (forward and backward DIS flow, occlusion masks), sharded by frame pairs.

Pair p is frames (p, p+1). Pairs are chunked like frames/, so unit k computes pairs
[k*C, (k+1)*C) and reads frames up to one past its block. No diffusion model is involved,
so the stage opens the project directly instead of resolving model settings.
"""

from __future__ import annotations

import cv2
import numpy as np

from vfx import opticalflow as F
from vfx.errors import BadInput
from vfx.project import Project
from vfx import graph
from vfx.driver import Stage, drive
from vfx.stage import Part, Shard, StageRun, upstream
from vfx.store import chunk_ranges, create_array, open_array

FOLDER = "flow"
ARRAYS = graph.FLOW_ARRAYS


class Flow(Stage):
    unit_name = "chunks"

    def __init__(self, project: Project, preset: str, shard: Shard | None, force: bool):
        F.check_preset(preset)
        self.project, self.preset = project, preset
        self.label = f"flow ({preset})"
        source = upstream(project, "extract", "frames.zarr")
        self.frames = open_array(project.path("frames", "frames.zarr"))
        count = self.frames.shape[0]
        if count < 2:
            raise BadInput(f"flow needs at least 2 frames; {project.path('frames')} holds {count}")
        self.ranges = chunk_ranges(count - 1, self.frames.chunks[0])
        params = {"method": F.METHOD, "preset": preset, "occlusion": F.OCCLUSION_RULE}
        self.run = StageRun(project.path(FOLDER), "flow", params, source.input(), len(self.ranges),
                            force=force, shard=shard)

    def create(self) -> None:
        count, height, width, _ = self.frames.shape
        chunk = self.frames.chunks[0]
        attrs = {"method": F.METHOD, "preset": self.preset, "opencv": cv2.__version__, "pairs": "t -> t+1"}
        for name in ("forward", "backward"):
            create_array(self.run.path / f"{name}.zarr", (count - 1, 2, height, width), (chunk, 2, height, width),
                         "float16", {**attrs, "kind": "flow", "direction": name, "units": "pixels (dx, dy)"})
        for name in ("occlusion_forward", "occlusion_backward"):
            create_array(self.run.path / f"{name}.zarr", (count - 1, height, width), (chunk, height, width), "uint8",
                         {**attrs, "kind": "mask", "rule": F.OCCLUSION_RULE, "thresholds": F.THRESHOLDS,
                          "meaning": "1 = occluded / unreliable"})

    def arrays(self, mode: str = "r") -> dict:
        return {name: open_array(self.run.path / f"{name}.zarr", mode=mode) for name in ARRAYS}

    def do_unit(self, unit: int, bar) -> None:
        start, end = self.ranges[unit]
        block = np.asarray(self.frames[start : end + 1])
        results = [F.flow_pair(block[i], block[i + 1], self.preset) for i in range(end - start)]
        for index, (name, array) in enumerate(self.arrays("r+").items()):
            dtype = np.float16 if index < 2 else np.uint8
            array[start:end] = np.stack([r[index] for r in results]).astype(dtype)

    def parts(self, unit: int) -> list[Part]:
        return [Part(f"{name}.zarr", *self.ranges[unit]) for name in ARRAYS]

    def finalize(self) -> dict:
        """Summary numbers for `vfx status` / `inspect`, streamed chunk by chunk."""
        arrays = self.arrays()
        count, height, width, _ = self.frames.shape
        magnitude, occluded, pixels = 0.0, 0.0, 0
        for start, end in self.ranges:
            forward = np.asarray(arrays["forward"][start:end], dtype=np.float32)
            magnitude += float(np.sqrt((forward**2).sum(axis=1)).sum())
            occluded += float(np.asarray(arrays["occlusion_forward"][start:end]).sum())
            pixels += forward.shape[0] * height * width
        return {"pairs": count - 1, "method": F.METHOD, "preset": self.preset, "opencv": cv2.__version__,
                "mean_magnitude": round(magnitude / pixels, 4), "occluded_fraction": round(occluded / pixels, 4)}

    def report(self, summary: dict) -> dict:
        return {"method": F.METHOD, "preset": self.preset}


def compute_flow(project: Project, preset: str = F.DEFAULT_PRESET, shard: Shard | None = None, force: bool = False) -> dict:
    return drive(Flow(project, preset, shard, force))
