"""`vfx flow`: frames -> flow/ (forward and backward DIS flow, occlusion masks), sharded by frame pairs.

Pair p is frames (p, p+1). Pairs are chunked like frames/, so unit k computes pairs
[k*C, (k+1)*C) and reads frames up to one past its block. No diffusion model is involved,
so the stage opens the project directly instead of resolving model settings.
"""

from __future__ import annotations

import cv2
import numpy as np

from vfx import flow as F
from vfx.errors import BadInput
from vfx.project import Project
from vfx.stage import Part, Shard, StageRun, upstream
from vfx.stages.common import outcome, run_units, up_to_date_result
from vfx.store import chunk_ranges, create_array, open_array

FOLDER = "flow"
ARRAYS = ("forward", "backward", "occlusion_forward", "occlusion_backward")


def frames_upstream(project: Project) -> dict:
    return upstream(project, "frames", "extract", "vfx extract {dir} --video FILE")


def flow_upstream(project: Project) -> dict:
    """The complete flow record, or an error naming `vfx flow DIR`."""
    return upstream(project, FOLDER, "flow", "vfx flow {dir}")


def compute_flow(project: Project, preset: str = F.DEFAULT_PRESET, shard: Shard | None = None, force: bool = False) -> dict:
    F.check_preset(preset)
    frames_record = frames_upstream(project)
    frames = open_array(project.path("frames", "frames.zarr"))
    count, height, width, _ = frames.shape
    if count < 2:
        raise BadInput(f"flow needs at least 2 frames; {project.path('frames')} holds {count}")
    chunk = frames.chunks[0]
    ranges = chunk_ranges(count - 1, chunk)
    params = {"method": F.METHOD, "preset": preset, "occlusion": F.OCCLUSION_RULE}
    run = StageRun(project.path(FOLDER), "flow", params, {"frames": frames_record["fingerprint"]}, len(ranges),
                   force=force, shard=shard)
    if run.up_to_date() and not force:
        return up_to_date_result(run, {"method": F.METHOD, "preset": preset})

    def create() -> None:
        attrs = {"method": F.METHOD, "preset": preset, "opencv": cv2.__version__, "pairs": "t -> t+1"}
        for name in ("forward", "backward"):
            create_array(run.path / f"{name}.zarr", (count - 1, 2, height, width), (chunk, 2, height, width), "float16",
                         {**attrs, "kind": "flow", "direction": name, "units": "pixels (dx, dy)"})
        for name in ("occlusion_forward", "occlusion_backward"):
            create_array(run.path / f"{name}.zarr", (count - 1, height, width), (chunk, height, width), "uint8",
                         {**attrs, "kind": "mask", "rule": F.OCCLUSION_RULE, "thresholds": F.THRESHOLDS,
                          "meaning": "1 = occluded / unreliable"})

    pending = run.start(create)
    arrays = {name: open_array(run.path / f"{name}.zarr", mode="r+") for name in ARRAYS}

    def work(unit: int, bar) -> list[np.ndarray]:
        start, end = ranges[unit]
        block = np.asarray(frames[start : end + 1])
        results = [F.flow_pair(block[i], block[i + 1], preset) for i in range(end - start)]
        written = []
        for index, name in enumerate(ARRAYS):
            dtype = np.float16 if index < 2 else np.uint8
            data = np.stack([r[index] for r in results]).astype(dtype)
            arrays[name][start:end] = data
            written.append(data)
        return written

    def finalize() -> dict:
        # Summary numbers for `vfx status` / `inspect`, streamed chunk by chunk.
        magnitude, occluded, pixels = 0.0, 0.0, 0
        for start, end in ranges:
            forward = np.asarray(arrays["forward"][start:end], dtype=np.float32)
            magnitude += float(np.sqrt((forward**2).sum(axis=1)).sum())
            occluded += float(np.asarray(arrays["occlusion_forward"][start:end]).sum())
            pixels += forward.shape[0] * height * width
        return {"pairs": count - 1, "method": F.METHOD, "preset": preset, "opencv": cv2.__version__,
                "mean_magnitude": round(magnitude / pixels, 4), "occluded_fraction": round(occluded / pixels, 4)}

    def parts(unit: int) -> list[Part]:
        return [Part(f"{name}.zarr", *ranges[unit]) for name in ARRAYS]

    computed = run_units(run, pending, work, f"flow ({preset})", parts=parts)
    complete = run.finish(finalize)
    return outcome(run, complete, computed, {"method": F.METHOD, "preset": preset})
