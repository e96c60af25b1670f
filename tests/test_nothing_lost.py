"""Nothing lost, nothing silently wrong: bad input changes no byte, upstreams are held steady while read,
damaged chunks are refused, non-finite values never become a complete artifact, nothing is written
through a link, and every bad option value of every command is refused before any model loads."""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import (
    EDIT_STEPS, assert_bad, chunk_files, cli_command, cli_env, copy_project, image_folder, inverted, invoke, ok,
    run_cli, run_edit, snapshot, status_rows, textured, video_project,
)
from dreambooth_helpers import CLASS_PROMPT, PROMPT, make_photos, run_dir, train_args


def clip(count: int = 6) -> list[np.ndarray]:
    return [np.roll(textured(64, seed=7), 3 * k, axis=1) for k in range(count)]


# Command lines over a project; "{root}", "{photos}" and the like are filled in when they run.
RUN = "dog"
INVERT = ("invert", "{root}", "--steps", EDIT_STEPS, "--save-steps", EDIT_STEPS, "--no-reconstruction")
EDIT = ("edit", "{root}", "--name", "e", "--prompt", "a red robot", "--steps", EDIT_STEPS)
REGULARIZE = ("regularize", "{root}", "--name", RUN, "--class-prompt", CLASS_PROMPT, "--num-images", "1",
              "--steps", "1")
TRAIN = tuple(train_args("{root}", RUN, "{photos}", "--mode", "lora", "--validation-prompt", PROMPT,
                         "--validation-images", "1", "--validation-steps", "1", "--eval-pairs", "0", steps=1))
SAMPLE = ("sample", "{root}", "--name", RUN, "--prompt", PROMPT, "--num-images", "1", "--steps", "1")


def filled(args, **paths) -> list[str]:
    return [str(arg).format(**paths) for arg in args]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_photos(tmp_path_factory.mktemp("photos") / "photos", 3)


@pytest.fixture(scope="module")
def complete(tmp_path_factory, photos):
    """A project with every stage complete, on the tiny model with the fewest steps: frames, latents,
    inversion, flow, edit e, its decode and eval; DreamBooth run dog with a class image, LoRA weights
    (a checkpoint and a validation image on the way) and a sample."""
    root = inverted(tmp_path_factory.mktemp("complete"), clip())
    ok("flow", root)
    run_edit(root, "--name", "e")
    ok("decode", root, "--edit", "e")
    ok("eval", root, "--edit", "e")
    for command in (REGULARIZE, TRAIN, SAMPLE):
        ok(*filled(command, root=root, photos=photos))
    return root


def flip_a_byte(array) -> None:
    path = array / sorted(name for name in chunk_files(array) if "/c/" in f"/{name}")[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def set_toml_line(root, line: str) -> None:
    """Put `line` (KEY = VALUE) into vfx.toml's [project] table in place of KEY's own line."""
    toml = root / "vfx.toml"
    key = line.split(" = ")[0]
    lines = [row for row in toml.read_text().splitlines() if not row.startswith(f"{key} =")]
    lines.insert(lines.index("[project]") + 1, line)
    toml.write_text("\n".join(lines) + "\n")


TRUNCATED = b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"  # the start of a safetensors header, cut short


@pytest.fixture
def garbage(tmp_path):
    """A file named .safetensors that is not one (a truncated download)."""
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(TRUNCATED)
    return path


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, complete) -> dict[str, Path]:
    """Bad inputs, outside the project: a model file cut short, LoRAs that are truncated, of other
    shapes or without layers, a FIFO, a video of noise, a photo that is no image, keyframes that are
    no JSON."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("bad")
    lora = run_dir(complete, RUN) / "weights" / "pytorch_lora_weights.safetensors"
    files = {name: folder / name for name in ("garbage.safetensors", "lora-truncated.safetensors",
                                              "lora-shapes.safetensors", "lora-empty.safetensors", "noise.mp4",
                                              "keyframes.json")}
    files["garbage.safetensors"].write_bytes(TRUNCATED)
    files["lora-truncated.safetensors"].write_bytes(lora.read_bytes()[:100])
    save_file({key: torch.zeros(value.shape[0] + 1, *value.shape[1:]) for key, value in load_file(lora).items()},
              files["lora-shapes.safetensors"])
    save_file({"weight": torch.zeros(2)}, files["lora-empty.safetensors"])
    files["noise.mp4"].write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    files["keyframes.json"].write_text("[[0, 1], [")
    files["fifo"] = folder / "pipe.png"
    os.mkfifo(files["fifo"])
    files["junk-photos"] = folder / "junk-photos"
    files["junk-photos"].mkdir()
    (files["junk-photos"] / "0.png").write_bytes(b"not a png")
    return {name.split(".")[0]: path for name, path in files.items()}


# ---------------------------------------------------------------- validate, then touch

TOML = ("toml", "seed = -3")

# Every stage that writes, with each class of bad input that applies to it: a file that is no model,
# a bad LoRA, a bad vfx.toml value, a non-finite number, a negative seed, a damaged or unreadable input.
# (command line, damage done to a copy of the project first, or None)
BAD_RUNS = {
    "extract, a FIFO as the video": (("extract", "{root}", "--video", "{fifo}", "--force"), None),
    "extract, a video of noise": (("extract", "{root}", "--video", "{noise}", "--force"), None),
    "extract, fps nan": (("extract", "{root}", "--fps", "nan", "--force"), None),
    "extract, a bad vfx.toml value": (("extract", "{root}", "--force"), TOML),
    "encode, a file that is no model": (("encode", "{root}", "--model", "{garbage}"), None),
    "encode, a bad vfx.toml value": (("encode", "{root}", "--force"), TOML),
    "encode, a damaged frames chunk": (("encode", "{root}", "--force"), ("chunk", "frames/frames.zarr")),
    "invert, a file that is no model": ((*INVERT, "--model", "{garbage}"), None),
    "invert, a bad vfx.toml value": ((*INVERT, "--force"), TOML),
    "invert, a damaged latents chunk": ((*INVERT, "--force"), ("chunk", "latents/latents.zarr")),
    "depth, a file that is no DPT model": (("depth", "{root}", "--model", "tiny-depth", "--depth-model", "{garbage}"),
                                           None),
    "flow, a bad vfx.toml value": (("flow", "{root}", "--force"), TOML),
    "flow, a damaged frames chunk": (("flow", "{root}", "--force"), ("chunk", "frames/frames.zarr")),
    "edit, a file that is no model": ((*EDIT, "--model", "{garbage}"), None),
    "edit, a truncated LoRA": ((*EDIT, "--lora", "{lora-truncated}"), None),
    "edit, a LoRA of other shapes": ((*EDIT, "--lora", "{lora-shapes}"), None),
    "edit, a LoRA without layers": ((*EDIT, "--lora", "{lora-empty}"), None),
    "edit, guidance nan": ((*EDIT, "--guidance", "nan"), None),
    "edit, control scale inf": ((*EDIT, "--control", "canny", "--control-scale", "inf"), None),
    "edit, lora scale nan": ((*EDIT, "--lora", "{root}/dreambooth/dog/weights", "--lora-scale", "nan"), None),
    "edit, a negative seed": ((*EDIT, "--seed", "-1"), None),
    "edit, keyframes that are no JSON": ((*EDIT, "--keyframes", "{keyframes}"), None),
    "edit, a FIFO as keyframes": ((*EDIT, "--keyframes", "{fifo}"), None),
    "edit, a bad vfx.toml value": ((*EDIT, "--force"), TOML),
    "edit, a damaged trajectory chunk": ((*EDIT, "--force"), ("chunk", "inversion/trajectory.zarr")),
    "decode, a file that is no model": (("decode", "{root}", "--model", "{garbage}"), None),
    "decode of an edit, a file that is no model": (("decode", "{root}", "--edit", "e", "--model", "{garbage}"), None),
    "decode, a bad vfx.toml value": (("decode", "{root}", "--edit", "e", "--force"), TOML),
    "decode, a damaged edit chunk": (("decode", "{root}", "--edit", "e", "--force"), ("chunk", "edits/e/latents.zarr")),
    "eval, a file that is no CLIP model": (("eval", "{root}", "--edit", "e", "--clip", "{garbage}"), None),
    "eval, a bad vfx.toml value": (("eval", "{root}", "--edit", "e", "--force"), TOML),
    "eval, a damaged decoded chunk": (("eval", "{root}", "--edit", "e", "--force"), ("chunk", "decoded/e/frames.zarr")),
    "eval-subject, a file that is no CLIP model": (("eval-subject", "--samples", "{root}/dreambooth/dog/samples",
                                                    "--real", "{photos}", "--clip", "{garbage}"), None),
    "regularize, a file that is no model": ((*REGULARIZE, "--model", "{garbage}"), None),
    "regularize, guidance nan": ((*REGULARIZE, "--guidance", "nan"), None),
    "regularize, a negative seed": ((*REGULARIZE, "--seed", "-1"), None),
    "regularize, a bad vfx.toml value": ((*REGULARIZE, "--force"), TOML),
    "train, a file that is no model": ((*TRAIN, "--model", "{garbage}"), None),
    "train, learning rate nan": ((*TRAIN, "--learning-rate", "nan"), None),
    "train, a negative seed": ((*TRAIN, "--seed", "-1"), None),
    "train, a photo that is no image": ((*TRAIN, "--instance-dir", "{junk-photos}"), None),
    "train, a truncated class image": ((*TRAIN, "--force"), ("truncate", "dreambooth/dog/class/000000.png")),
    "train, a bad vfx.toml value": ((*TRAIN, "--force"), TOML),
    "sample, a file that is no base model": ((*SAMPLE, "--base", "--model", "{garbage}"), None),
    "sample, a truncated LoRA": ((*SAMPLE, "--lora", "{lora-truncated}"), None),
    "sample, a LoRA of other shapes": ((*SAMPLE, "--lora", "{lora-shapes}"), None),
    "sample, a LoRA without layers": ((*SAMPLE, "--lora", "{lora-empty}"), None),
    "sample, guidance inf": ((*SAMPLE, "--guidance", "inf"), None),
    "sample, a negative seed": ((*SAMPLE, "--seed", "-1"), None),
    "sample, a FIFO as prompts file": ((*SAMPLE, "--prompts-file", "{fifo}"), None),
    "sample, damaged weights": ((*SAMPLE, "--force"),
                                ("flip", "dreambooth/dog/weights/pytorch_lora_weights.safetensors")),
    "sample, a bad vfx.toml value": ((*SAMPLE, "--force"), TOML),
}


def damage(root: Path, how: tuple[str, str]) -> None:
    kind, what = how
    if kind == "toml":
        set_toml_line(root, what)
    elif kind == "chunk":
        flip_a_byte(root / what)
    else:
        path = root / what
        data = bytearray(path.read_bytes())
        if kind == "truncate":
            del data[len(data) // 2:]
        else:
            data[-3] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_a_failing_command_changes_no_byte_of_the_project(complete, photos, bad_files, tmp_path, case):
    args, how = BAD_RUNS[case]
    root = complete
    if how is not None:
        root = tmp_path / "copy"
        shutil.copytree(complete, root, symlinks=True)
        damage(root, how)
    before = snapshot(root)
    assert_bad(invoke(*filled(args, root=root, photos=photos, **bad_files)))
    assert snapshot(root) == before, case


@pytest.mark.parametrize("line, words", [
    ("prompt = 42", ["prompt", "42", "str"]),
    ("seed = -3", ["seed", "-3", "0 or more"]),
    ("chunk_frames = 0", ["chunk_frames", "at least 1"]),
    ("max_frames = \"all\"", ["max_frames", "int"]),
])
def test_a_bad_vfx_toml_value_exits_2_naming_the_key_and_touches_nothing(complete, tmp_path, line, words):
    root = tmp_path / "copy"
    shutil.copytree(complete, root, symlinks=True)
    set_toml_line(root, line)
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


def rewrite_record(folder: Path, artifact: str) -> None:
    """What a writer that takes no lock (another host, say) does to `folder`: its artifact gets another
    fingerprint."""
    from vfx.fsutil import atomic_write_json, read_json

    record = read_json(folder / "stage.json")
    record["artifacts"][artifact] = "0" * 32
    atomic_write_json(folder / "stage.json", record)


def test_an_upstream_rewritten_during_the_unit_loop_leaves_the_stage_unfinished(complete, tmp_path, monkeypatch):
    from vfx.stages.encode import Encode

    root = copy_project(complete, tmp_path / "proj", ("frames",))
    do_unit = Encode.do_unit

    def rewritten_meanwhile(self, unit, bar):
        if unit == 0:
            rewrite_record(root / "frames", "frames.zarr")
        do_unit(self, unit, bar)

    monkeypatch.setattr(Encode, "do_unit", rewritten_meanwhile)
    result = invoke("encode", root)
    assert result.exit_code == 1 and "frames.zarr changed while this stage read it" in result.stderr
    assert status_rows(root)["latents"]["state"] == "partial"
    monkeypatch.undo()
    ok("encode", root)  # against the frames as they are now
    assert status_rows(root)["latents"]["state"] == "complete"


def test_an_upstream_rewritten_while_training_keeps_the_earlier_weights(complete, photos, tmp_path, monkeypatch):
    from vfx.dreambooth.train import Train

    root = tmp_path / "copy"
    shutil.copytree(complete, root, symlinks=True)
    weights = run_dir(root, RUN) / "weights"
    before = snapshot(weights)
    build = Train.build

    def rewritten_meanwhile(self, scratch):
        rewrite_record(run_dir(root, RUN) / "class", "manifest.json")
        return build(self, scratch)

    monkeypatch.setattr(Train, "build", rewritten_meanwhile)
    train = filled((*TRAIN, "--force"), root=root, photos=photos)
    result = invoke(*train)
    assert result.exit_code == 1 and "manifest.json changed while this stage read it" in result.stderr
    assert snapshot(weights) == before
    monkeypatch.undo()
    ok(*train)
    assert status_rows(root)["dreambooth/dog/weights"]["state"] == "complete"


# ---------------------------------------------------------------- no writes through links


@pytest.mark.parametrize("folder, command", [  # checkpoints/: tests/test_dreambooth_sample.py
    ("class", (*REGULARIZE, "--force")),
    ("samples", (*SAMPLE, "--force")),
    ("validation", (*TRAIN, "--force")),
    ("weights", (*TRAIN, "--force")),
])
def test_no_dreambooth_output_is_written_through_a_link(complete, photos, tmp_path, folder, command):
    root = tmp_path / "copy"
    shutil.copytree(complete, root, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    link = run_dir(root, RUN) / folder
    shutil.rmtree(link)
    link.symlink_to(outside, target_is_directory=True)
    assert_bad(invoke(*filled(command, root=root, photos=photos)), "symbolic link")
    assert sorted(p.name for p in outside.rglob("*")) == ["keep.txt"]
    assert (outside / "keep.txt").read_text() == "mine"


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
    frames = image_folder(tmp_path / "frames", clip(4))
    root = video_project(tmp_path / "p", frames, "--size", "64x64", "--chunk-frames", "4", stages=("extract", "encode"))
    latents = zarr.open_array(str(root / "latents" / "latents.zarr"), mode="r+")
    latents[1, 0, 0, 0] = np.nan  # a poisoned input that its own checksum codec accepts
    # The first inversion: rerunning one would read the latents back first, and refuse them as damaged.
    result = invoke(*filled(INVERT, root=root))
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


@pytest.mark.parametrize("content", ["cut short", "no model in it"])
def test_a_single_file_model_is_looked_up_without_the_network(complete, tmp_path, monkeypatch, content):
    import torch
    from safetensors.torch import save_file

    model = tmp_path / "model.safetensors"
    if content == "cut short":
        model.write_bytes(TRUNCATED)
    else:  # a readable file: the loader goes on to look for the configs of the architecture it guesses
        save_file({"weight": torch.zeros(2)}, model)
    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise OSError("no network here")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    assert_bad(invoke("encode", complete, "--model", model), model.name)
    assert calls == []


# ---------------------------------------------------------------- every option, every bad value
# Each numeric option of every command gets non-numbers, non-finite numbers and (where only a positive
# value makes sense) a negative one; each option naming a file or folder gets a FIFO and a missing path.
# Each is refused with exit 2 and one line, before any model loads.

NUMBERS = ("nan", "inf", "-inf", "1e309", "abc")
MAY_BE_NEGATIVE = {"guidance", "lora_scale"}  # a negative guidance or LoRA scale is a valid, if odd, choice
PATH_LIKE = {"model", "model_config", "control_model", "resume"}  # text options that may name a file or folder
# Files a command writes, where a missing one (and its folder) is made.
OUTPUTS = {("eval", "plot"), ("inspect", "preview"), ("report", "out")}
# Commands whose normal run is too heavy for the campaign: `model random` builds a real-size model
# (its refusals are tested in test_random_models.py).
HEAVY = {"model random"}

# What each command runs with on the complete project, without the bad value: all succeed (tested
# below), so a refusal comes from the bad value. "{new}" is a fresh folder.
BASES = {
    "init": ("init", "{new}/proj"),
    "plan": ("plan", "{root}", "encode"),
    "status": ("status", "{root}", "--missing", "sample", "--name", RUN),
    "inspect": ("inspect", "{root}/latents/latents.zarr"),
    "demo-video": ("demo-video", "{new}/clip.mp4"),
    "extract": ("extract", "{root}"),
    "encode": ("encode", "{root}"),
    "depth": ("depth", "{root}", "--model", "tiny-depth"),
    "decode": ("decode", "{root}", "--edit", "e"),
    "invert": INVERT,
    "edit": EDIT,
    "run": ("run", "{root}", "--prompt", "a red robot", "--name", "e", "--steps", EDIT_STEPS),
    "regularize": REGULARIZE,
    "train": (*TRAIN, "--force"),  # else a changed option meets the run's checkpoints first
    "sample": SAMPLE,
    "tokens": ("tokens", "{root}"),
    "eval": ("eval", "{root}", "--edit", "e"),
    "report": ("report", "{root}", "--out", "{new}/report/index.html"),
    "export": ("export", "{root}", "--name", RUN, "--out", "{new}/lora.safetensors"),
    "eval-subject": ("eval-subject", "--samples", "{root}/dreambooth/dog/samples", "--real", "{photos}",
                     "--dino", "{vit}"),
    ("train", "--resume"): TRAIN,  # --resume and --force exclude each other
}


def commands(group, prefix: tuple = ()):
    """(name, click command) of every command of `group`, its groups' commands included."""
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            yield from commands(command, (*prefix, name))
        else:
            yield " ".join((*prefix, name)), command


def value_type(hint):
    """int of `Annotated[int | None, ...]`."""
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    return next(kind for kind in typing.get_args(hint) or (hint,) if kind is not type(None))


def bad_values() -> list[tuple[str, str, str]]:
    """(command, flag, bad value) for every numeric and path option of the app."""
    cases = []
    for name, command in commands(cli_command()):
        if name in HEAVY:
            continue
        hints = typing.get_type_hints(inspect.unwrap(command.callback), include_extras=True)
        for param in command.params:
            flag = next((opt for opt in param.opts if opt.startswith("--")), None)
            if flag is None:
                continue
            kind = value_type(hints[param.name])
            if kind in (int, float):
                values = NUMBERS + (() if param.name in MAY_BE_NEGATIVE else ("-1",))
            elif kind is Path or param.name in PATH_LIKE:
                values = ("{fifo}",) if (name, param.name) in OUTPUTS else ("{fifo}", "{missing}")
            else:
                continue
            cases += [(name, flag, value) for value in values]
    return cases


CAMPAIGN = bad_values()


class Hung(BaseException):
    """A command that did not return in time: it waits for something (a FIFO's other end?)."""


class ModelLoaded(BaseException):
    """A model loaded before the bad value was refused."""


@pytest.fixture(scope="module")
def campaign_root(complete, tmp_path_factory) -> Path:
    """A copy of the complete project: what the campaign runs on."""
    root = tmp_path_factory.mktemp("campaign") / "proj"
    shutil.copytree(complete, root, symlinks=True)
    return root


@pytest.fixture
def campaign_paths(campaign_root, photos, tiny_vit, tmp_path) -> dict[str, Path]:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    return {"root": campaign_root, "photos": photos, "vit": tiny_vit, "new": tmp_path, "fifo": fifo,
            "missing": tmp_path / "missing" / "nothing.png"}


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading a pipeline raises ModelLoaded (a BaseException: no command turns it into an exit code);
    a command that is still running after 60 s raises Hung."""
    from diffusers import StableDiffusionPipeline

    def loaded(*args, **kwargs):
        raise ModelLoaded(args)

    def hung(signum, frame):
        raise Hung()

    for name in ("from_pretrained", "from_single_file"):
        monkeypatch.setattr(StableDiffusionPipeline, name, loaded)
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.slow
@pytest.mark.parametrize("base", list(BASES), ids=str)
def test_each_command_of_the_campaign_succeeds_without_a_bad_value(campaign_paths, base):
    result = invoke(*filled(BASES[base], **campaign_paths))
    assert result.exit_code == 0, result.output


@pytest.mark.slow
@pytest.mark.parametrize("command, flag, value", CAMPAIGN)
def test_every_bad_option_value_is_refused_in_one_line_before_any_model_loads(campaign_paths, no_model_loads,
                                                                              command, flag, value):
    base = BASES.get((command, flag)) or BASES[command]
    assert_bad(invoke(*filled((*base, flag, value), **campaign_paths)))
