"""Distributed edit: speed-up of a 2-process `vfx edit` (torchrun, gloo, CPU) over one process, and
the communication volume per step as a function of keyframes and resolution.

Each rank all-reduces one float32 tensor per step: the K keyframes' latents [K, 4, H/8, W/8]. With a
ring all-reduce each rank sends and receives about 2 (W-1)/W times its size. Both processes run with
one thread each (OMP_NUM_THREADS=1), as does the single-process run, so the comparison is fair on
2 cores.

    python bench/bench_distributed_edit.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, make_project, settings, table  # noqa: E402

FRAMES, STEPS, SIZE = 256, 4, 64


def prepare() -> Path:
    from vfx.stages.encode import encode
    from vfx.stages.invert import invert

    root = make_project(FRAMES, SIZE)
    s = settings(root)
    encode(s, 8)
    invert(s, STEPS, STEPS, "", 8, False)
    return root


def run_edit(root: Path, name: str, processes: int) -> tuple[float, float]:
    """(wall seconds including start-up, seconds of the edit loop on the slowest rank)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", VFX_QUIET="1")
    edit = ["-m", "vfx", "edit", str(root), "--prompt", "a red robot", "--steps", str(STEPS), "--name", name, "--json"]
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        "--nproc_per_node", str(processes)]
    began = time.perf_counter()
    proc = subprocess.run(launcher + edit, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - began
    reports = [json.loads(doc) for doc in proc.stdout.replace("}\n{", "}\x00{").split("\x00") if doc.strip()]
    return wall, max(r["seconds"] for r in reports)


def latents(root: Path, name: str) -> bytes:
    import numpy as np
    import zarr

    return np.asarray(zarr.open_array(str(root / "edits" / name / "latents.zarr"))).tobytes()


def main() -> None:
    os.environ["VFX_QUIET"] = "1"
    root = prepare()
    (wall1, loop1), (wall2, loop2) = run_edit(root, "one", 1), run_edit(root, "two", 2)
    same = latents(root, "one") == latents(root, "two")
    print(table(f"edit of {FRAMES} frames, {STEPS} steps, {SIZE} px, tiny model, CPU",
                ["processes", "edit loop s", "speed-up", "wall s (with start-up)", "same bytes as 1"],
                [[1, loop1, 1.0, wall1, "-"], [2, loop2, loop1 / loop2, wall2, same]]))
    rows = []
    for side in (256, 512, 768):
        for keyframes in (4, 16, 64):
            size = keyframes * 4 * (side // 8) ** 2 * 4
            rows.append([side, keyframes, size / 2**20, 2 * (2 - 1) / 2 * size / 2**20])
    print()
    print(table("all-reduce per step and rank (float32 keyframe latents)",
                ["frame side px", "keyframes", "tensor MB", "sent per rank MB (2 ranks, ring)"], rows))


if __name__ == "__main__":
    main()
