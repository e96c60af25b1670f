"""`vfx status` says why a stage is not up to date and the command, with its recorded options, that makes it so."""

from __future__ import annotations

import shlex

import numpy as np

from conftest import EDIT_STEPS, chunk_files, invoke, inverted, ok, ok_json, run_edit, status_rows, textured


def moving(count: int = 6) -> list[np.ndarray]:
    return [np.roll(textured(32, seed=2), 3 * k, axis=1) for k in range(count)]


def run(command: str):
    """Run a command line that status printed (in-process), which must succeed."""
    words = shlex.split(command)
    assert words[0] == "vfx", command
    return ok(*words[1:])


def test_an_edit_names_what_changed_upstream_and_the_command_that_redoes_it(tmp_path):
    root = inverted(tmp_path, moving())
    run_edit(root, "--name", "e", "--guidance", "5")
    rows = status_rows(root)
    # Finished, not decoded: the decode command.
    assert rows["edits/e"]["why"] == "not decoded yet" and rows["edits/e"]["next"] == f"vfx decode {root} --edit e"
    assert rows["edits/e"]["outputs"] == ["edits/e/latents.zarr"]

    ok("invert", root, "--steps", EDIT_STEPS, "--save-steps", EDIT_STEPS, "--no-reconstruction", "--prompt", "a wall")
    row = status_rows(root)["edits/e"]
    assert row["state"] == "stale"
    assert row["why"] == "inversion/trajectory.zarr changed: invert was rerun with prompt  → a wall"
    # The recorded command line, the flags of that run only (--json) left out.
    assert row["next"] == f"vfx edit {root} --prompt 'a red robot' --steps {EDIT_STEPS} --name e --guidance 5"
    run(row["next"])
    assert status_rows(root)["edits/e"]["state"] == "complete"


def test_a_partial_stage_lists_its_chunks_to_do_and_the_command_without_the_shard(tmp_path, gen_video):
    root = tmp_path / "p"
    ok("init", root, "--video", gen_video, "--size", "32x32", "--chunk-frames", "2")
    ok("extract", root)
    ok("encode", root, "--shard", "1/3", "--batch-size", "2")
    row = status_rows(root)["latents"]
    assert row["state"] == "partial" and row["why"] == "chunks 0-1, 4-5 of 0-5 to do"
    assert row["next"] == f"vfx encode {root} --batch-size 2"
    run(row["next"])
    assert status_rows(root)["latents"]["state"] == "complete"


def test_verify_names_the_damaged_chunks_and_exits_non_zero(tmp_path, gen_video):
    root = tmp_path / "p"
    ok("init", root, "--video", gen_video, "--size", "32x32", "--chunk-frames", "4")
    ok("extract", root)
    ok("encode", root)
    assert invoke("status", root, "--verify").exit_code == 0
    array = root / "latents" / "latents.zarr"
    chunk = array / [name for name in sorted(chunk_files(array)) if name.startswith("c/")][-1]  # frames 8-11
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))

    assert invoke("status", root).exit_code == 0  # without --verify nothing is read back
    result = invoke("status", root, "--verify")
    assert result.exit_code == 1 and "damaged: latents" in result.stderr
    assert "latents: damaged: chunk 2 of 0-2 no longer match their checksums" in result.stdout
    assert f"run: vfx encode {root}" in result.stdout
    run(f"vfx encode {root}")
    assert invoke("status", root, "--verify").exit_code == 0


def test_status_lines_fit_80_columns_and_commands_stay_whole(tmp_path):
    root = inverted(tmp_path, moving())
    run_edit(root, "--name", "long", "--negative-prompt", "blurry, low quality, " * 4, "--control", "canny")
    lines = invoke("status", root).stdout.splitlines()
    commands = [line.strip() for line in lines if line.strip().startswith("run: ")]
    assert commands == ["run: vfx flow " + str(root), f"run: vfx decode {root} --edit long"]
    assert all(len(line) <= 80 for line in lines if not line.strip().startswith(("run: ", "out: ")))


def test_the_editing_schedule_is_a_project_default(tmp_path, gen_video):
    root = tmp_path / "p"
    ok("init", root, "--video", gen_video, "--size", "32x32", "--max-frames", "4", "--steps", "2")
    assert "steps = 2" in (root / "vfx.toml").read_text()
    for stage in ("extract", "encode"):
        ok(stage, root)
    ok("invert", root, "--steps", "4", "--no-reconstruction")  # saves vfx.toml's 2-step schedule
    assert status_rows(root)["inversion"]["params"]["save_steps"] == 2
    result = ok_json("edit", root, "--prompt", "a red robot", "--name", "e")  # denoises with it
    assert result["state"] == "complete" and status_rows(root)["edits/e"]["params"]["steps"] == 2
