"""examples/slurm and examples/Makefile.pipeline, run for real against stand-ins: a fake `sbatch`
that runs array tasks one by one with the SLURM variables set, and make with two local shards.
Whole pipelines in subprocesses: slow."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli_env, invoke, status_rows, video_project

SLURM = REPO / "examples" / "slurm"
pytestmark = pytest.mark.slow


def vfx_shim(folder: Path) -> Path:
    """A `vfx` executable running this checkout with the test interpreter."""
    shim = folder / "vfx"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m vfx \"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return shim


@pytest.fixture
def small(tmp_path, gen_video) -> Path:
    return video_project(tmp_path / "proj", gen_video, "--size", "32x32", "--chunk-frames", "4", "--max-frames", "8",
                         stages=())


def fake_slurm(tmp_path, **extra: str) -> tuple[dict, Path]:
    """(the environment of a shell with the stand-in `sbatch` and `vfx` first on PATH, its call log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(REPO / "tests" / "fake_slurm" / "sbatch", bin_dir / "sbatch")
    vfx_shim(bin_dir)
    log = tmp_path / "sbatch.log"
    return cli_env() | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log), **extra}, log


def test_driver_chains_arrays_sized_by_plan(small, tmp_path):
    env, log = fake_slurm(tmp_path, INVERT_ARGS="--steps 10 --save-steps 5")
    proc = subprocess.run(["bash", str(SLURM / "pipeline.sh"), str(small)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = log.read_text().splitlines()
    assert any("vfx-encode.sbatch" in c and "--array=0-1" in c for c in calls), calls
    assert any("vfx-flow.sbatch" in c and "--array=0-1" in c for c in calls), calls  # 7 pairs in chunks of 4
    assert any("vfx-invert.sbatch" in c and "--dependency=afterok:42" in c for c in calls), calls
    states = {folder: row["state"] for folder, row in status_rows(small).items()}
    for folder in ("latents", "inversion", "flow", "decoded/source", "eval/inversion"):
        assert states.get(folder) == "complete", states
    assert not {"partial", "missing", "stale"} & set(states.values()), states

    # Damage one chunk: resubmit.sh re-runs only the shard that owns it.
    (small / "latents" / "latents.zarr" / "c" / "1" / "0" / "0" / "0").unlink()
    log.write_text("")
    proc = subprocess.run(["bash", str(SLURM / "resubmit.sh"), str(small), "encode"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--array=1 " in log.read_text()
    assert invoke("status", small, "--missing", "encode", "--verify").stdout.strip() == ""


def test_driver_estimates_depth_first_for_a_depth_model(tmp_path, gen_video):
    root = video_project(tmp_path / "proj", gen_video, "--size", "32x32", "--chunk-frames", "4", "--max-frames", "8",
                         "--model", "tiny-depth", stages=())
    env, log = fake_slurm(tmp_path, INVERT_ARGS="--steps 4 --save-steps 2", DEPTH="1")
    proc = subprocess.run(["bash", str(SLURM / "pipeline.sh"), str(root)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = log.read_text().splitlines()
    assert any("vfx-depth.sbatch" in c and "--array=0-1" in c for c in calls), calls
    assert any("vfx-invert.sbatch" in c and "--dependency=afterok:42:42" in c for c in calls), calls
    states = {folder: row["state"] for folder, row in status_rows(root).items()}
    assert states.get("depth") == states.get("inversion") == "complete", states


def test_makefile_pipeline_with_local_shards(small, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    vfx_shim(bin_dir)
    env = cli_env() | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["make", "-f", str(REPO / "examples" / "Makefile.pipeline"), f"PROJ={small}", "SHARDS=2",
                           "INVERT_ARGS=--steps 10 --save-steps 5", "decode", "flow"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = {folder: row["state"] for folder, row in status_rows(small).items()}
    assert states["decoded/source"] == states["flow"] == "complete", states
    assert not {"partial", "stale"} & set(states.values()), states
    assert (small / "decoded" / "source" / "video.mp4").exists()
