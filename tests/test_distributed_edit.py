"""Multi-process `vfx edit` under torchrun (2 CPU processes, gloo) equals the single-process edit."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

from conftest import cli_env, inverted, invoke, textured


@pytest.mark.slow
def test_two_processes_give_the_single_process_bytes(tmp_path):
    frames = [np.roll(textured(64, seed=11), 4 * k, axis=1) for k in range(13)]  # 4 chunks of 4, the last of 1
    root = inverted(tmp_path, frames)
    # 4 keyframes a step; calls of 6 frames: the keyframes' call takes frames of rank 0's first chunk,
    # which rank 1 runs too
    args = ["edit", str(root), "--prompt", "a red robot", "--steps", "3", "--batch-size", "4", "--frame-batch", "6"]
    single = invoke(*args, "--name", "single", "--json")
    assert single.exit_code == 0, single.output
    env = cli_env()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vfx",
         *args, "--name", "multi", "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(doc) for doc in proc.stdout.replace("}\n{", "}\x00{").split("\x00") if doc.strip()]
    assert sorted(r["rank"] for r in reports) == [0, 1] and all(r["world_size"] == 2 for r in reports)
    # Per step, every rank runs the keyframes' call (4 keyframes and the first 2 frames to propagate), then
    # the batches that hold its own frames: 6 frames straddling both ranks, then 1 frame of rank 1's.
    evaluations = {r["rank"]: r["unet_frame_evaluations"] for r in reports}
    assert evaluations == {0: 3 * 3 * (6 + 6), 1: 3 * 3 * (6 + 6 + 1)}
    assert json.loads(single.stdout)["unet_frame_evaluations"] == 3 * 3 * 13
    a = np.asarray(zarr.open_array(str(root / "edits" / "single" / "latents.zarr")))
    b = np.asarray(zarr.open_array(str(root / "edits" / "multi" / "latents.zarr")))
    assert a.tobytes() == b.tobytes()
    record = json.loads((root / "edits" / "multi" / "stage.json").read_text())
    assert record["state"] == "complete"
    assert record["summary"]["keyframes"] == json.loads((root / "edits" / "single" / "stage.json").read_text())["summary"]["keyframes"]
