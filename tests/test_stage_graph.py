"""The stage graph and the driver: artifact dependencies, cheap checks first, checksummed edit steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from conftest import EDIT_STEPS, chunk_files, edited, inverted, invoke, ok, ok_json, run_cli, run_edit, status_rows, textured
from vfx import graph


def moving(count: int = 6) -> list[np.ndarray]:
    return [np.roll(textured(64, seed=5), 4 * k, axis=1) for k in range(count)]


def test_every_stage_has_a_row_naming_its_command_and_known_upstreams():
    for name, row in graph.STAGES.items():
        assert row.command.startswith(f"vfx {name} "), name
        assert row.artifacts and all(up in graph.STAGES for up in row.upstream)
    assert graph.SHARDABLE == ("encode", "depth", "invert", "flow", "decode", "eval", "regularize", "sample")


def test_an_edit_depends_on_the_trajectory_not_on_the_reconstruction_option(tmp_path):
    root = inverted(tmp_path, moving())
    run_edit(root, "--name", "e")
    ok("decode", root, "--edit", "e")
    before = edited(root, "e").tobytes()
    # The same trajectory with a reconstruction: invert recomputes, its trajectory fingerprint stays.
    ok("invert", root, "--steps", EDIT_STEPS, "--save-steps", EDIT_STEPS)
    rows = status_rows(root)
    assert rows["inversion"]["state"] == "complete"
    assert rows["edits/e"]["state"] == "complete" and rows["decoded/e"]["state"] == "complete"
    assert run_edit(root, "--name", "e")["up_to_date"] is True
    assert edited(root, "e").tobytes() == before
    # Another inversion prompt changes the trajectory: the edit and its decode turn stale.
    ok("invert", root, "--steps", EDIT_STEPS, "--save-steps", EDIT_STEPS, "--prompt", "a textured wall")
    rows = status_rows(root)
    assert rows["edits/e"]["state"] == "stale" and rows["decoded/e"]["state"] == "stale"


def test_an_up_to_date_stage_loads_no_model(tmp_path, monkeypatch):
    root = inverted(tmp_path, moving(4))
    run_edit(root, "--name", "e")

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    import vfx.settings

    monkeypatch.setattr(vfx.settings, "load_pipeline", refuse)
    monkeypatch.setattr(vfx.settings, "load_vae", refuse)  # encode loads the VAE alone
    for args in (("encode", root), ("invert", root, "--steps", EDIT_STEPS, "--save-steps", EDIT_STEPS,
                                    "--no-reconstruction")):
        assert ok_json(*args)["up_to_date"] is True
    assert run_edit(root, "--name", "e")["up_to_date"] is True
    # --force is decided first: it recomputes, so here it reaches the (refused) model load.
    result = invoke("encode", root, "--force")
    assert result.exit_code == 1 and "the model was loaded" in result.stderr


def test_only_rank_0_prints_messages(tmp_path):
    root = inverted(tmp_path, moving(2))
    quiet = {"VFX_QUIET": ""}
    main = run_cli("encode", root, "--force", env={**quiet, "RANK": "0"})
    other = run_cli("encode", root, "--force", env={**quiet, "RANK": "1"})
    assert "encode" in main.stderr
    assert other.stderr == ""


def test_bitsandbytes_import_warnings_are_not_printed(tmp_path):
    """On CPUs with AVX512-BF16, importing bitsandbytes (diffusers does whenever it is installed) tries to
    fetch a 4-bit kernel vfx never uses, and bitsandbytes and `kernels` warn that it cannot: every command
    would print both."""
    import logging

    root = inverted(tmp_path, moving(2))
    assert invoke("status", root).exit_code == 0
    # the loggers that warn
    for emitter in map(logging.getLogger, ["bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"]):
        assert not emitter.isEnabledFor(logging.WARNING) and emitter.isEnabledFor(logging.ERROR)


def test_a_secondary_rank_repeats_no_library_warning(tmp_path):
    root = inverted(tmp_path, moving(2))
    script = ("import logging, sys, warnings; from vfx.cli import main; sys.argv = ['vfx', 'status', sys.argv[1]]\n"
              "try: main()\nexcept SystemExit: pass\n"
              "logging.getLogger('diffusers').warning('a library warning'); warnings.warn('a python warning')\n"
              "logging.getLogger('diffusers').error('a library error')")
    env = {**os.environ, "RANK": "1", "VFX_QUIET": ""}
    proc = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stderr.strip() == "a library error"


def edit_markers(root, name: str) -> dict[int, dict]:
    folder = root / "edits" / name / ".done"
    return {int(path.stem): json.loads(path.read_text()) for path in folder.glob("*.json")}


def test_edit_steps_are_checksummed_and_a_damaged_edit_is_repaired(tmp_path):
    root = inverted(tmp_path, moving())
    run_edit(root, "--name", "e")
    good = edited(root, "e").tobytes()
    markers = edit_markers(root, "e")
    assert sorted(markers) == list(range(EDIT_STEPS))
    last = markers[EDIT_STEPS - 1]
    assert last["sha256"] and [p["path"] for p in last["parts"]] == ["latents.zarr"]
    assert all(not markers[step].get("parts") for step in range(EDIT_STEPS - 1))  # their buffers are gone
    assert all(len(m["keyframes"]) == 1 for m in markers.values())

    flip_a_byte(root / "edits" / "e" / "latents.zarr")
    row = status_rows(root, "--verify")["edits/e"]
    assert row["state"] == "damaged" and row["damaged_units"] == [EDIT_STEPS - 1]

    result = run_edit(root, "--name", "e")
    assert result["up_to_date"] is False and result["computed_steps"] == EDIT_STEPS
    assert edited(root, "e").tobytes() == good
    assert status_rows(root, "--verify")["edits/e"]["state"] == "complete"


def flip_a_byte(array) -> None:
    """Corrupt the first chunk file of a Zarr array in place."""
    path = array / sorted(chunk_files(array))[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_an_interrupted_edit_checksums_its_latest_buffer_and_a_damaged_one_is_recomputed(tmp_path, monkeypatch):
    from vfx.stage import StageFolder
    from vfx.stages.edit import Edit

    root = inverted(tmp_path, moving())
    run_edit(root, "--name", "whole")
    good = edited(root, "whole").tobytes()

    original = Edit.mark

    def mark_then_die(self, step, parts, seconds):
        original(self, step, parts, seconds)
        if step == 1:
            raise RuntimeError("killed after step 1")

    monkeypatch.setattr(Edit, "mark", mark_then_die)
    assert invoke("edit", root, "--prompt", "a red robot", "--steps", EDIT_STEPS, "--name", "e").exit_code == 1
    monkeypatch.setattr(Edit, "mark", original)
    markers = edit_markers(root, "e")
    assert sorted(markers) == [0, 1]
    assert [p["path"] for p in markers[1]["parts"]] == ["work-0.zarr"]  # step 1 wrote the second buffer's twin
    folder = StageFolder(root / "edits" / "e")
    assert folder.check_unit(1) == "ok" and folder.check_unit(0) == "unverified"

    flip_a_byte(root / "edits" / "e" / "work-0.zarr")
    row = status_rows(root, "--verify")["edits/e"]
    assert row["state"] == "damaged" and row["damaged_units"] == [1]
    result = run_edit(root, "--name", "e")
    assert result["computed_steps"] == 2  # step 1 again (its input buffer is intact), then step 2
    assert edited(root, "e").tobytes() == good
