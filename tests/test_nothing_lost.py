"""Nothing lost, nothing silently wrong: bad input changes no byte, upstreams are held steady while read,
damaged chunks are refused, non-finite values never become a complete artifact."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr

from conftest import (
    EDIT_STEPS, assert_bad, chunk_files, cli_env, inverted, invoke, ok, run_cli, run_edit, snapshot, status_rows,
    textured,
)


def clip(count: int = 6) -> list[np.ndarray]:
    return [np.roll(textured(64, seed=7), 3 * k, axis=1) for k in range(count)]


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    """A project with every video stage complete: frames, latents, inversion, flow, edit e, its decode."""
    root = inverted(tmp_path_factory.mktemp("complete"), clip())
    ok("flow", root)
    run_edit(root, "--name", "e")
    ok("decode", root, "--edit", "e")
    return root


def flip_a_byte(array) -> None:
    path = array / sorted(name for name in chunk_files(array) if "/c/" in f"/{name}")[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def garbage(tmp_path):
    """A file named .safetensors that is not one (a truncated download)."""
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    return path


# ---------------------------------------------------------------- validate, then touch

BAD_RUNS = {
    "encode, a file that is no model": ("encode", "--model", "GARBAGE"),
    "decode, a file that is no model": ("decode", "--model", "GARBAGE"),
    "decode of an edit, a file that is no model": ("decode", "--edit", "e", "--model", "GARBAGE"),
    "invert, a file that is no model": ("invert", "--steps", EDIT_STEPS, "--save-steps", EDIT_STEPS, "--model",
                                        "GARBAGE"),
    "edit, a truncated LoRA": ("edit", "--name", "e", "--prompt", "a red robot", "--steps", EDIT_STEPS, "--lora",
                               "GARBAGE"),
    "edit, guidance nan": ("edit", "--name", "e", "--prompt", "a red robot", "--steps", EDIT_STEPS, "--guidance",
                           "nan"),
    "edit, control scale inf": ("edit", "--name", "e", "--prompt", "a red robot", "--steps", EDIT_STEPS,
                                "--control", "canny", "--control-scale", "inf"),
    "edit, lora scale nan": ("edit", "--name", "e", "--prompt", "a red robot", "--steps", EDIT_STEPS, "--lora",
                             "GARBAGE", "--lora-scale", "nan"),
    "edit, a negative seed": ("edit", "--name", "e", "--prompt", "a red robot", "--steps", EDIT_STEPS, "--seed", "-1"),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_a_failing_command_changes_no_byte_of_the_project(complete, garbage, case):
    args = [str(garbage) if arg == "GARBAGE" else arg for arg in BAD_RUNS[case]]
    before = snapshot(complete)
    result = invoke(args[0], complete, *args[1:])
    assert_bad(result)
    assert snapshot(complete) == before, case


@pytest.mark.parametrize("line, words", [
    ("prompt = 42", ["prompt", "42", "str"]),
    ("seed = -3", ["seed", "-3", "0 or more"]),
    ("chunk_frames = 0", ["chunk_frames", "at least 1"]),
    ("max_frames = \"all\"", ["max_frames", "int"]),
])
def test_a_bad_vfx_toml_value_exits_2_naming_the_key_and_touches_nothing(complete, tmp_path, line, words):
    root = tmp_path / "copy"
    shutil.copytree(complete, root, symlinks=True)
    toml = root / "vfx.toml"
    key = line.split(" = ")[0]
    lines = [row for row in toml.read_text().splitlines() if not row.startswith(f"{key} =")]
    lines.insert(lines.index("[project]") + 1, line)
    toml.write_text("\n".join(lines) + "\n")
    before = snapshot(root)
    assert_bad(invoke("invert", root, "--steps", EDIT_STEPS, "--save-steps", EDIT_STEPS, "--force"), *words)
    assert snapshot(root) == before


def test_an_unknown_vfx_toml_key_warns_with_the_nearest_one(complete, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(complete, root, symlinks=True)
    toml = root / "vfx.toml"
    toml.write_text(toml.read_text().replace("[project]", "[project]\npromt = \"a woman\"", 1))
    result = invoke("status", root, "--json")
    assert result.exit_code == 0
    assert "unknown key 'promt'" in result.stderr and "did you mean 'prompt'" in result.stderr


# ---------------------------------------------------------------- upstreams held steady


READER = """
import sys
from vfx.project import Project
from vfx.stage import upstream
upstream(Project.open(sys.argv[1]), "encode", "latents.zarr")  # what invert does first, holding it
print("reading", flush=True)
sys.stdin.read()
"""


def test_a_rewrite_of_an_upstream_being_read_is_refused(tmp_path):
    root = inverted(tmp_path, clip(4))
    latents = chunk_files(root / "latents" / "latents.zarr")
    reader = subprocess.Popen([sys.executable, "-c", READER, str(root)], env=cli_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "reading"
        refused = run_cli("encode", root, "--force", check=False)
        assert refused.returncode == 75, refused.stderr
        assert "in use by" in refused.stderr and f"pid {reader.pid}" in refused.stderr
        assert chunk_files(root / "latents" / "latents.zarr") == latents
        assert status_rows(root)["latents"]["state"] == "complete"
    finally:
        reader.communicate("", timeout=60)
    ok("encode", root, "--force")  # the reader is gone: the rewrite goes ahead
    assert status_rows(root)["inversion"]["state"] == "complete"  # the same latents: nothing turned stale


def test_two_runs_of_one_edit_name_do_not_interleave(tmp_path):
    from vfx import locks

    root = inverted(tmp_path, clip(4))
    folder = root / "edits" / "same"
    folder.parent.mkdir(parents=True)
    lock = locks.hold(folder, exclusive=True, purpose="a test", run=True)
    try:
        result = run_cli("edit", root, "--name", "same", "--prompt", "a blue car", "--steps", EDIT_STEPS, check=False)
    finally:
        locks.release(lock)
    assert result.returncode == 75 and "in use by" in result.stderr
    assert not (folder / "stage.json").exists()
    run_edit(root, "--name", "same")  # once the other run is gone, it runs


# ---------------------------------------------------------------- every byte checked


@pytest.mark.parametrize("array, reader, repair", [
    ("inversion/trajectory.zarr", ("edit", "--name", "x", "--prompt", "a red robot", "--steps", EDIT_STEPS),
     ("invert", "--steps", EDIT_STEPS, "--save-steps", EDIT_STEPS, "--no-reconstruction")),
    ("latents/latents.zarr", ("invert", "--steps", EDIT_STEPS, "--save-steps", EDIT_STEPS, "--force"),
     ("encode",)),
    ("frames/frames.zarr", ("flow", "--force"), ("extract",)),
    ("flow/forward.zarr", ("edit", "--name", "x", "--prompt", "a red robot", "--steps", EDIT_STEPS,
                           "--correspondence", "flow"), ("flow",)),
])
def test_a_damaged_chunk_is_reported_refused_and_repaired(complete, tmp_path, array, reader, repair):
    root = tmp_path / "copy"
    shutil.copytree(complete, root, symlinks=True)
    folder = array.split("/")[0]
    good = chunk_files(root / array)
    flip_a_byte(root / array)
    assert status_rows(root, "--verify")[folder]["state"] == "damaged"
    line = assert_bad(invoke(reader[0], root, *reader[1:]), array.split("/")[-1], "damaged", f"vfx {repair[0]}")
    assert "repair" in line
    ok(repair[0], root, *repair[1:])
    assert chunk_files(root / array) == good
    assert status_rows(root, "--verify")[folder]["state"] == "complete"


def test_non_finite_values_never_become_a_complete_artifact(tmp_path):
    root = inverted(tmp_path, clip(4))
    latents = zarr.open_array(str(root / "latents" / "latents.zarr"), mode="r+")
    latents[1, 0, 0, 0] = np.nan  # a poisoned input that its own checksum codec accepts
    result = invoke("invert", root, "--steps", EDIT_STEPS, "--save-steps", EDIT_STEPS, "--force",
                    "--no-reconstruction")
    assert result.exit_code == 1 and "non-finite" in result.stderr and "unit 0" in result.stderr
    rows = status_rows(root)
    assert rows["inversion"]["state"] == "partial" and rows["inversion"]["done"] == 0


# ---------------------------------------------------------------- bad input: one line, exit 2


def test_bad_files_are_one_line_and_exit_2(complete, tmp_path, garbage):
    from PIL import Image

    fifo = tmp_path / "clip.mp4"
    os.mkfifo(fifo)
    assert_bad(invoke("extract", complete, "--video", fifo, "--force"), "not a regular file")
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    Image.new("RGB", (1, 1)).save(bomb / "0.png")
    with Image.open(bomb / "0.png") as image:  # claims 30000 x 30000 pixels
        image.resize((30000, 30000), Image.NEAREST).save(bomb / "1.png", compress_level=9)
    project = tmp_path / "bombs"
    os.remove(bomb / "0.png")
    ok("init", project, "--video", bomb, "--size", "64x64")
    assert_bad(invoke("extract", project), "too large")
    assert_bad(invoke("inspect", garbage), "not a readable safetensors")
    broken = tmp_path / "broken.zarr"
    shutil.copytree(complete / "latents" / "latents.zarr", broken)
    (broken / "zarr.json").write_text("{ not json")
    assert_bad(invoke("inspect", broken), "unreadable metadata")
    prompts = tmp_path / "prompts.txt"
    os.mkfifo(prompts)
    assert_bad(invoke("sample", complete, "--name", "run", "--prompts-file", prompts), "not a regular file")


@pytest.mark.parametrize("args", [
    ("extract", "--fps", "inf", "--force"),
    ("extract", "--fps", "nan", "--force"),
    ("regularize", "--name", "r", "--class-prompt", "a dog", "--guidance", "nan"),
    ("regularize", "--name", "r", "--class-prompt", "a dog", "--seed", "-5"),
    ("sample", "--name", "r", "--prompt", "a dog", "--guidance", "inf"),
    ("train", "--name", "r", "--instance-dir", ".", "--instance-prompt", "a zwx dog", "--learning-rate", "nan"),
    ("edit", "--name", "e", "--prompt", "x", "--pnp-attn-t", "nan"),
    ("edit", "--name", "e", "--prompt", "x", "--seed", "-2"),
], ids=lambda a: " ".join(a[:1] + a[-2:]))
def test_every_command_refuses_non_finite_numbers_and_negative_seeds(complete, args):
    before = snapshot(complete)
    assert_bad(invoke(args[0], complete, *args[1:]))
    assert snapshot(complete) == before
