"""Fault campaigns over the shardable stages: SIGKILL at random points, concurrent shards, damaged
chunks and records, a full disk. Every campaign must end with the bytes of an uninterrupted run.

tests/test_stage_engine.py holds the single-kill and basic concurrency cases; these generalise them.
"""

from __future__ import annotations

import errno
import json
import os
import random
import sys
from pathlib import Path

import pytest

from conftest import (
    assert_bad, chunk_files, copy_project, done_markers, invoke, kill_after_markers, ok, ok_json, run_shards,
    snapshot, status_rows, video_project,
)

# stage -> (folder, arrays compared, CLI arguments after the project directory)
STAGES = {
    "encode": ("latents", ("latents.zarr",), ()),
    "invert": ("inversion", ("trajectory.zarr", "reconstruction_latents.zarr", "reconstruction.zarr"),
               ("--steps", "20", "--save-steps", "5")),
    "flow": ("flow", ("forward.zarr", "backward.zarr", "occlusion_forward.zarr", "occlusion_backward.zarr"), ()),
    "decode": ("decoded/source", ("frames.zarr",), ()),
}
ORDER = ("encode", "invert", "flow", "decode")
UPSTREAM = {"encode": ("frames",), "invert": ("frames", "latents"), "flow": ("frames",), "decode": ("frames", "latents")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Every stage run uninterrupted, in one process, on 6 frames in chunks of one frame."""
    from vfx.media import synthetic_video

    base = tmp_path_factory.mktemp("reference")
    video = synthetic_video(base / "clip.mp4", frames=6, size=64, fps=12)
    return video_project(base / "proj", video, "--size", "64x64", "--chunk-frames", "1",
                         stages=("extract", *((stage, *STAGES[stage][2]) for stage in ORDER)))


def vfx(stage: str, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vfx", stage, str(root), *STAGES[stage][2], *extra]


def kill_at_random_point(stage: str, root: Path, rng: random.Random) -> None:
    kill_command_at_random_point(vfx(stage, root), root / STAGES[stage][0], rng)


def kill_command_at_random_point(command: list[str], folder: Path, rng: random.Random) -> None:
    """Start the command, let it finish a random number (maybe zero) of further units, then SIGKILL it
    anywhere: mid-chunk, mid-marker, mid-record."""
    target = done_markers(folder) + rng.randint(0, 2)
    kill_after_markers(command, folder, target, timeout=120, jitter=rng.uniform(0, 0.05))


def assert_same_arrays(stage: str, root: Path, reference: Path) -> None:
    folder, arrays, _ = STAGES[stage]
    for array in arrays:
        assert chunk_files(root / folder / array) == chunk_files(reference / folder / array), (stage, array)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ORDER)
def test_random_kills_then_concurrent_shards_give_identical_bytes(stage, reference, tmp_path):
    """Three SIGKILLs at random points, then two concurrent shards finish: the bytes of one clean run."""
    root = copy_project(reference, tmp_path / "proj", UPSTREAM[stage])
    rng = random.Random(f"{stage}-campaign")
    for _ in range(3):
        kill_at_random_point(stage, root, rng)
    run_shards(vfx(stage, root), 2)
    assert_same_arrays(stage, root, reference)
    record = json.loads((root / STAGES[stage][0] / "stage.json").read_text())
    assert record["state"] == "complete"
    assert ok_json(stage, root, *STAGES[stage][2])["up_to_date"] is True


def verify(root: Path) -> dict[str, dict]:
    return status_rows(root, "--verify")


def chunk_path(array: Path, unit: int) -> Path:
    return array / "c" / str(unit) / "0" / "0" / "0"


DAMAGE = {
    "flipped bytes": lambda path: path.write_bytes(path.read_bytes()[:8] + b"\xff\x00" * 4 + path.read_bytes()[16:]),
    "truncated chunk": lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]),
    "deleted chunk": lambda path: path.unlink(),
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_chunk_is_reported_and_repaired(how, reference, tmp_path):
    root = copy_project(reference, tmp_path / "proj", ("frames", "latents", "inversion"))
    DAMAGE[how](chunk_path(root / "latents" / "latents.zarr", 4))
    rows = verify(root)
    assert rows["latents"]["state"] == "damaged" and rows["latents"]["damaged_units"] == [4]
    assert rows["inversion"]["state"] == "complete"  # repair keeps the fingerprint: downstream stays valid
    assert invoke("status", root, "--missing", "encode", "--verify").stdout.strip() == "4"
    assert invoke("status", root, "--missing", "encode", "--verify", "--shards", "2").stdout.strip() == "1"
    assert ok_json("encode", root)["computed_units"] == 1
    assert verify(root)["latents"]["state"] == "complete"
    assert_same_arrays("encode", root, reference)


def test_torn_marker_and_record_are_damage_too(reference, tmp_path):
    root = copy_project(reference, tmp_path / "proj", ("frames", "latents", "flow"))
    marker = root / "latents" / ".done" / "000002.json"
    marker.write_text(marker.read_text()[:10])
    record = root / "flow" / "stage.json"
    record.write_text(record.read_text()[:40])
    rows = verify(root)
    assert rows["latents"]["damaged_units"] == [2]
    assert rows["flow"]["state"] == "damaged"
    assert status_rows(root)["flow"]["state"] == "damaged"  # an unreadable record shows without --verify too
    assert ok_json("encode", root)["computed_units"] == 1
    ok("flow", root)  # an unreadable record: the stage starts over
    rows = verify(root)
    assert rows["latents"]["state"] == rows["flow"]["state"] == "complete"
    assert_same_arrays("encode", root, reference)
    assert_same_arrays("flow", root, reference)


def test_full_disk_is_a_clear_retryable_error(reference, tmp_path, monkeypatch):
    """ENOSPC on the third chunk written: one line, exit 75, earlier artifacts intact, a rerun resumes."""
    import zarr.storage

    root = copy_project(reference, tmp_path / "proj", ("frames",))
    before = snapshot(root / "frames")
    real_set = zarr.storage.LocalStore.set
    writes = {"n": 0}

    async def filling_set(self, key, value):
        if key.startswith("c/"):
            writes["n"] += 1
            if writes["n"] >= 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", filling_set)
    result = invoke("encode", root)
    assert result.exit_code == 75, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "disk full" in lines[0] and "rerun" in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert snapshot(root / "frames") == before
    assert len(list((root / "latents" / ".done").glob("*.json"))) == 2
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real_set)
    assert ok_json("encode", root)["computed_units"] == 4
    assert_same_arrays("encode", root, reference)


def test_plan_and_missing_match_the_array(reference, tmp_path):
    root = copy_project(reference, tmp_path / "proj", ("frames",))
    assert invoke("plan", root, "encode").stdout.strip() == "6"
    assert invoke("plan", root, "flow").stdout.strip() == "5"  # frame pairs
    assert invoke("plan", root, "invert", "--per-shard", "4").stdout.strip() == "2"
    assert json.loads(invoke("plan", root, "decode", "--json").stdout)["array"] == "0-5"
    assert invoke("plan", root, "regularize", "--name", "dog", "--images", "10", "--batch-size", "4").stdout.strip() == "3"
    assert invoke("status", root, "--missing", "encode").stdout.strip() == "0-5"
    for shard in ("1/6", "2/6", "4/6", "5/6"):
        assert invoke("encode", root, "--shard", shard).exit_code == 0
    assert invoke("status", root, "--missing", "encode").stdout.strip() == "0,3"
    assert invoke("status", root, "--missing", "encode", "--shards", "3").stdout.strip() == "0-1"
    assert_bad(invoke("plan", root, "nonsense"), "'nonsense'")
    assert_bad(invoke("plan", root, "sample", "--name", "dog"), "--images")


def test_array_spec_syntax():
    from vfx.plan import array_spec

    assert array_spec([0, 1, 2, 3, 7, 9, 10, 11]) == "0-3,7,9-11"
    assert array_spec([]) == ""
    assert array_spec([5]) == "5"


# Stages whose units are images or metric parts: folder, files compared, CLI arguments.
OTHER_STAGES = {
    "regularize": ("dreambooth/prior/class", "*.png",
                   ("--name", "prior", "--class-prompt", "a photo of a dog", "--num-images", "6", "--steps", "2",
                    "--batch-size", "1", "--size", "64")),
    "sample": ("dreambooth/prior/samples-base", "*.png",
               ("--name", "prior", "--base", "--prompt", "a photo of a dog", "--num-images", "6", "--steps", "2",
                "--batch-size", "1", "--size", "64")),
    "eval": ("eval/source", "parts/*.json", ("--edit", "source")),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(OTHER_STAGES))
def test_random_kills_then_shards_for_image_and_metric_stages(stage, reference, tmp_path):
    """regularize, sample and eval: three random SIGKILLs, then two concurrent shards == one clean run."""
    folder, pattern, args = OTHER_STAGES[stage]
    clean = copy_project(reference, tmp_path / "clean", ("frames", "latents", "flow", "decoded"))
    ok(stage, clean, *args)
    root = copy_project(reference, tmp_path / "proj", ("frames", "latents", "flow", "decoded"))
    command = [sys.executable, "-m", "vfx", stage, str(root), *args]
    rng = random.Random(f"{stage}-campaign")
    for _ in range(3):
        kill_command_at_random_point(command, root / folder, rng)
    run_shards(command)
    files = lambda base: {p.relative_to(base): p.read_bytes() for p in sorted(base.glob(pattern))}  # noqa: E731
    assert files(clean / folder) and files(root / folder) == files(clean / folder)
    assert json.loads((root / folder / "stage.json").read_text())["state"] == "complete"
