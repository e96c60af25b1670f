"""The stage contract: shards, SLURM variables, concurrent processes, SIGKILL and resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import (
    chunk_files, cli_env, copy_project, kill_after_markers, ok, ok_json, run_cli, run_shards, vfx_command,
    video_project,
)
from vfx.errors import BadInput
from vfx.stage import Shard


def test_shard_blocks_cover_every_unit_once():
    for total in (0, 1, 5, 12):
        for count in (1, 2, 3, 7):
            units = [u for k in range(count) for u in Shard(k, count).units(total)]
            assert units == list(range(total))


def test_shard_from_slurm_sparse_stepped_ids():
    env = {"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_STEP": "2",
           "SLURM_ARRAY_TASK_COUNT": "4"}
    assert Shard.parse(None, env) == Shard(2, 4)
    assert Shard.parse("1/3", env) == Shard(1, 3)  # the flag wins
    assert Shard.parse(None, {}) == Shard(0, 1)
    with pytest.raises(BadInput):
        Shard.parse(None, {**env, "SLURM_ARRAY_TASK_ID": "15"})


@pytest.mark.parametrize("spec", ["3/2", "0/0", "-1/2", "a/b", "1"])
def test_bad_shard_specs(spec):
    with pytest.raises(BadInput):
        Shard.parse(spec, {})


def test_concurrent_shards_equal_one_process(encoded, tmp_path):
    sharded = copy_project(encoded, tmp_path / "sharded", ("frames",))
    run_shards(vfx_command("encode", sharded))
    assert (sharded / "latents" / "stage.json").exists()
    assert json.loads((sharded / "latents" / "stage.json").read_text())["state"] == "complete"
    assert chunk_files(sharded / "latents" / "latents.zarr") == chunk_files(encoded / "latents" / "latents.zarr")


@pytest.mark.slow
def test_concurrent_shards_via_slurm_variables(encoded, tmp_path):
    sharded = copy_project(encoded, tmp_path / "slurm", ("frames",))
    procs = []
    for task in (4, 6, 8):  # a stepped array: --array=4-8:2
        env = cli_env() | {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_STEP": "2",
                           "SLURM_ARRAY_TASK_COUNT": "3"}
        procs.append(subprocess.Popen([sys.executable, "-m", "vfx", "encode", str(sharded)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for proc in procs:
        assert proc.wait(timeout=300) == 0
    assert chunk_files(sharded / "latents" / "latents.zarr") == chunk_files(encoded / "latents" / "latents.zarr")


@pytest.mark.slow
def test_sigkill_then_resume_recomputes_only_unfinished(tmp_path, gen_video):
    """Kill `vfx invert` (one frame per chunk, so it takes a while) after two chunks, then rerun."""
    killed = video_project(tmp_path / "killed", gen_video, "--size", "64x64", "--chunk-frames", "1", "--max-frames", "6",
                           stages=("extract", "encode"))
    clean = copy_project(killed, tmp_path / "clean", ("frames", "latents"))
    args = ["invert", "--steps", "40", "--save-steps", "10"]
    kill_after_markers(vfx_command(args[0], killed, *args[1:]), killed / "inversion", 2)
    done_dir = killed / "inversion" / ".done"
    survivors = {p.name: p.read_bytes() for p in done_dir.glob("*.json")}
    assert 2 <= len(survivors) < 6, "the kill should land mid-way"
    assert json.loads((killed / "inversion" / "stage.json").read_text())["state"] == "running"

    result = run_cli(*[args[0], killed, *args[1:]], "--json")
    assert json.loads(result.stdout)["computed_units"] == 6 - len(survivors)
    for name, content in survivors.items():  # finished chunks were not redone
        assert (done_dir / name).read_bytes() == content
    ok(args[0], clean, *args[1:])
    for array in ("trajectory.zarr", "reconstruction_latents.zarr", "reconstruction.zarr"):
        assert chunk_files(killed / "inversion" / array) == chunk_files(clean / "inversion" / array), array


@pytest.mark.slow
def test_concurrent_array_creation_is_safe(encoded, tmp_path):
    """Four processes start the same stage at once: one creates the array, all finish, no chunk is lost."""
    fresh = copy_project(encoded, tmp_path / "race", ("frames",))
    run_shards(vfx_command("encode", fresh), count=4)
    assert chunk_files(fresh / "latents" / "latents.zarr") == chunk_files(encoded / "latents" / "latents.zarr")
    assert ok_json("encode", fresh)["up_to_date"] is True


def test_completing_shard_sweeps_what_killed_writes_left(encoded, tmp_path):
    """A write killed between create and rename leaves Zarr's `KEY.<uuid>.partial` (or a marker's
    `.NAME.<random>.tmp`); the shard that completes the stage deletes them, so the artifact holds the
    bytes of a clean run and nothing else."""
    import uuid

    project = copy_project(encoded, tmp_path / "torn", ("frames",))
    ok("encode", project, "--shard", "0/2")
    array = project / "latents" / "latents.zarr"
    chunk = sorted(p for p in array.rglob("*") if p.is_file() and p.name != "zarr.json")[0]
    torn_chunk = chunk.with_suffix(f".{uuid.uuid4().hex}.partial")  # the name Zarr's local store writes to
    torn_chunk.write_bytes(chunk.read_bytes()[:7])
    torn_marker = project / "latents" / ".done" / ".00001.json.k3x_9qzp.tmp"
    torn_marker.write_text('{"sha')
    kept = project / "latents" / "notes.partial"  # not a temporary's name: stays
    kept.write_text("mine")

    ok("encode", project, "--shard", "1/2")
    assert json.loads((project / "latents" / "stage.json").read_text())["state"] == "complete"
    assert not torn_chunk.exists() and not torn_marker.exists() and kept.read_text() == "mine"
    assert chunk_files(array) == chunk_files(encoded / "latents" / "latents.zarr")
