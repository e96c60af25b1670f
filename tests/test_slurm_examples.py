"""examples/slurm and examples/Makefile.pipeline, run for real against stand-ins: a fake `sbatch`
that runs array tasks one by one with the SLURM variables set, and make with two local shards."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, invoke
from test_stage_engine import chunk_files, cli_env

SLURM = REPO / "examples" / "slurm"


def vfx_shim(folder: Path) -> Path:
    """A `vfx` executable running this checkout with the test interpreter."""
    shim = folder / "vfx"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m vfx \"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return shim


@pytest.fixture
def small(tmp_path, gen_video) -> Path:
    root = tmp_path / "proj"
    assert invoke("init", root, "--video", gen_video, "--size", "32x32", "--chunk-frames", "4", "--max-frames", "8").exit_code == 0
    return root


def test_driver_chains_arrays_sized_by_plan(small, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(REPO / "tests" / "fake_slurm" / "sbatch", bin_dir / "sbatch")
    vfx_shim(bin_dir)
    log = tmp_path / "sbatch.log"
    env = cli_env() | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log),
                       "INVERT_ARGS": "--steps 10 --save-steps 5"}
    proc = subprocess.run(["bash", str(SLURM / "pipeline.sh"), str(small)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = log.read_text().splitlines()
    assert any("vfx-encode.sbatch" in c and "--array=0-1" in c for c in calls), calls
    assert any("vfx-flow.sbatch" in c and "--array=0-1" in c for c in calls), calls  # 7 pairs in chunks of 4
    assert any("vfx-invert.sbatch" in c and "--dependency=afterok:42" in c for c in calls), calls
    status = invoke("status", small, "--json").stdout
    for folder in ("latents", "inversion", "flow", "decoded/source", "eval/inversion"):
        assert f'"folder": "{folder}"' in status
    assert '"partial"' not in status and '"missing"' not in status and '"stale"' not in status

    # Damage one chunk: resubmit.sh re-runs only the shard that owns it.
    (small / "latents" / "latents.zarr" / "c" / "1" / "0" / "0" / "0").unlink()
    log.write_text("")
    proc = subprocess.run(["bash", str(SLURM / "resubmit.sh"), str(small), "encode"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--array=1 " in log.read_text()
    assert invoke("status", small, "--missing", "encode", "--verify").stdout.strip() == ""


def test_makefile_pipeline_with_local_shards(small, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    vfx_shim(bin_dir)
    env = cli_env() | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["make", "-f", str(REPO / "examples" / "Makefile.pipeline"), f"PROJ={small}", "SHARDS=2",
                           "INVERT_ARGS=--steps 10 --save-steps 5", "decode", "flow"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = invoke("status", small, "--json").stdout
    assert '"partial"' not in status and '"stale"' not in status
    assert (small / "decoded" / "source" / "video.mp4").exists()
