"""Security and bad-input campaigns: malicious pickles, names and symlinks leaving the project,
and property-based (hypothesis) CLI arguments and malformed inputs. Every case has one right
outcome, decided from the input: success (exit 0), or exit 2 with one clear line; never a
traceback, and never a change to an existing artifact.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import assert_bad, copy_project, invoke, snapshot, video_project
from vfx.store import open_array
from dreambooth_helpers import make_photos

FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 4-frame 32x32 project, extracted and encoded, that the property tests must leave untouched."""
    from vfx.media import synthetic_video

    folder = tmp_path_factory.mktemp("hardening")
    video = synthetic_video(folder / "clip.mp4", frames=4, size=32, fps=8)
    return video_project(folder / "proj", video, "--size", "32x32", "--chunk-frames", "2", stages=("extract", "encode"))


@pytest.fixture(scope="module")
def inverted_base(base, tmp_path_factory) -> Path:
    """`base` inverted on the tiny model with few steps (4, latents saved for a 2-step edit): an
    `edit --steps 2` of it gets as far as loading its LoRA."""
    root = copy_project(base, tmp_path_factory.mktemp("inverted") / "proj", ("frames", "latents"))
    result = invoke("invert", root, "--steps", "4", "--save-steps", "2", "--no-reconstruction")
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_photos(tmp_path_factory.mktemp("photos") / "photos", 1)


def assert_outcome(result, expected: int, *words: str) -> None:
    """The one expected outcome: exit 0, or exit 2 with one 'error:' line holding `words`; never a traceback."""
    if expected == 2:
        assert_bad(result, *words)
    else:
        assert result.exit_code == expected, (result.exit_code, result.output)
        assert "Traceback" not in result.output


# ---------------------------------------------------------------- security


class Payload:
    """Unpickling this creates a marker folder: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def malicious(tmp_path: Path, name: str) -> tuple[Path, Path]:
    marker = tmp_path / f"pwned-{name}"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(Payload(marker)))
    return path, marker


# Every command that loads a model, with all it needs but a trustworthy --model: the checkpoint is the
# only thing wrong, so the refusal comes from the model loader (asserted: it names the file as a pickle).
MODEL_COMMANDS = [
    ("encode",), ("invert",), ("decode",), ("edit", "--prompt", "a cat"), ("tokens",),
    ("regularize", "--name", "dog", "--class-prompt", "a dog", "--num-images", "1"),
    ("sample", "--name", "dog", "--prompt", "a dog", "--base"),
    ("train", "--name", "dog", "--instance-prompt", "a sks dog", "--instance-dir", "{photos}"),
]


@pytest.mark.parametrize("suffix", ["ckpt", "pt"])
@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=lambda c: c[0])
def test_malicious_model_checkpoint_never_runs(base, photos, tmp_path, command, suffix):
    ckpt, marker = malicious(tmp_path, f"model.{suffix}")
    before = snapshot(base)
    args = [str(photos) if arg == "{photos}" else arg for arg in command[1:]]
    result = invoke(command[0], base, *args, "--model", ckpt)
    assert_bad(result, ckpt.name, "pickle", "--allow-pickle")
    assert not marker.exists()
    assert snapshot(base) == before


def test_malicious_pipeline_folder_weights_never_run(base, tmp_path):
    from vfx.models import tiny_model_dir

    folder = tmp_path / "pipeline"
    shutil.copytree(tiny_model_dir("tiny"), folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    evil, marker = malicious(folder / "unet", "diffusion_pytorch_model.bin")
    assert_bad(invoke("encode", base, "--model", folder, "--force"), str(evil), "pickled", "--allow-pickle")
    assert not marker.exists()


# A pickle as a LoRA: named .pt, it is refused by the LoRA loader for its suffix; disguised as
# .safetensors, the loader reads it as safetensors (which never unpickles) and refuses it as unreadable.
LORA_REFUSALS = {"pt": "must be a .safetensors file", "safetensors": "is not a readable safetensors file"}


@pytest.mark.parametrize("suffix", sorted(LORA_REFUSALS))
@pytest.mark.parametrize("command", [("edit", "--prompt", "a cat", "--steps", "2"),
                                     ("sample", "--name", "dog", "--prompt", "a dog", "--steps", "2")],
                         ids=lambda c: c[0])
def test_malicious_lora_never_runs(base, inverted_base, tmp_path, command, suffix):
    lora, marker = malicious(tmp_path, f"lora.{suffix}")
    root = inverted_base if command[0] == "edit" else copy_project(base, tmp_path / "proj", ("frames", "latents"))
    before = snapshot(root)
    assert_bad(invoke(command[0], root, *command[1:], "--lora", lora), str(lora), LORA_REFUSALS[suffix])
    assert not marker.exists()
    assert snapshot(root) == before


@pytest.mark.parametrize("args", [
    ("regularize", "--name", "../x", "--class-prompt", "a dog"),
    ("sample", "--name", "../x", "--prompt", "a dog"),
    ("edit", "--name", "../x", "--prompt", "a cat"),
    ("eval", "--edit", "../x"),
    ("plan", "decode", "--name", "../x"),
    ("status", "--missing", "sample", "--name", "/etc"),
], ids=lambda a: a[0])
def test_names_never_leave_the_project(base, args):
    before = snapshot(base)
    name = next(arg for arg in args if arg in ("../x", "/etc"))
    assert_bad(invoke(args[0], base, *args[1:]), "invalid", repr(name))  # refused for the name, which it quotes
    assert snapshot(base) == before
    assert not (base.parent / "x").exists()


@pytest.mark.parametrize("link", ["stage folder", "array", "markers"])
def test_symlinks_are_not_followed_out_of_the_project(base, tmp_path, link):
    root = tmp_path / "proj"
    shutil.copytree(base, root, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    latents = root / "latents"
    if link == "stage folder":
        shutil.rmtree(latents)
        latents.symlink_to(outside, target_is_directory=True)
    elif link == "array":
        shutil.rmtree(latents / "latents.zarr")
        (latents / "latents.zarr").symlink_to(outside, target_is_directory=True)
    else:
        shutil.rmtree(latents / ".done")
        (latents / ".done").symlink_to(outside, target_is_directory=True)
    assert_bad(invoke("encode", root, "--force"), "link" if link != "stage folder" else "leave")
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


def test_an_upstream_folder_that_is_a_link_is_not_read_through(base, tmp_path):
    """Reading takes a lock file in the upstream folder: a linked one (even inside the project) is refused."""
    root = tmp_path / "proj"
    shutil.copytree(base, root, symlinks=True)
    (root / "frames").rename(root / "frames-real")
    (root / "frames").symlink_to(root / "frames-real", target_is_directory=True)
    (root / "frames-real" / ".readers.lock").unlink(missing_ok=True)
    before = snapshot(root)
    assert_bad(invoke("encode", root, "--force"), "symbolic link")
    assert snapshot(root) == before and not (root / "frames-real" / ".readers.lock").exists()


# ---------------------------------------------------------------- property-based bad input
# Hypothesis campaigns: each runs the CLI 25 or more times, so they are slow.


@pytest.mark.slow
@FEW
@given(data=st.binary(min_size=0, max_size=4000))
def test_random_bytes_as_video(base, tmp_path_factory, data):
    video = tmp_path_factory.mktemp("bytes") / "random.mp4"
    video.write_bytes(data)
    before = snapshot(base)
    assert_bad(invoke("extract", base, "--video", video), video.name)
    assert snapshot(base) == before


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"]


@pytest.mark.slow
@FEW
@given(mode=st.sampled_from(MODES), width=st.integers(1, 40), height=st.integers(1, 40), count=st.integers(1, 3),
       fmt=st.sampled_from(["png", "jpg", "bmp", "tiff"]))
def test_images_of_odd_sizes_and_modes(tmp_path_factory, mode, width, height, count, fmt):
    """Any image Pillow writes, of any mode and size, extracts to the project's 32x32 frames: --size
    scales to cover, so even a 1x1 image makes a frame (nothing is ever too small for it)."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "frames").mkdir()
    rng = np.random.default_rng(width * 100 + height)
    for index in range(count):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
        try:
            image.save(folder / "frames" / f"{index:03d}.{fmt}")
        except (OSError, KeyError, ValueError):
            return  # PIL cannot write this mode in this format: nothing to test
    result = invoke("init", folder / "proj", "--video", folder / "frames", "--size", "32x32")
    assert result.exit_code == 0, result.output
    assert_outcome(invoke("extract", folder / "proj"), 0)
    frames = np.asarray(open_array(folder / "proj" / "frames" / "frames.zarr"))
    assert frames.shape == (count, 32, 32, 3) and frames.dtype == np.uint8


# Text as it arrives from a non-UTF-8 argv: undecodable bytes become lone surrogates.
NON_UTF8 = st.text(min_size=1, max_size=20).map(lambda t: t + "\udcff") | st.binary(min_size=1, max_size=20).map(
    lambda b: (b + b"\xff").decode("utf-8", "surrogateescape"))


@pytest.mark.slow
@FEW
@given(prompt=NON_UTF8, command=st.sampled_from([("invert", "--prompt"), ("edit", "--prompt"), ("init", "--prompt"),
                                                  ("regularize", "--class-prompt")]))
def test_non_utf8_prompts(base, prompt, command):
    before = snapshot(base)
    extra = ("--name", "dog") if command[0] == "regularize" else ()
    target = base if command[0] != "init" else base.parent / "fresh-init"
    assert_bad(invoke(command[0], target, command[1], prompt, *extra), "UTF-8")
    assert snapshot(base) == before
    assert not (base.parent / "fresh-init").exists()


@pytest.mark.slow
@FEW
@given(frames=st.integers(10**5 + 1, 10**30), size=st.integers(-10, 10**9))
def test_huge_frame_counts(tmp_path_factory, frames, size):
    out = tmp_path_factory.mktemp("huge") / "clip.mp4"
    assert_bad(invoke("demo-video", out, "--frames", frames, "--size", size))
    assert not out.exists()


def shard_is_valid(spec: str) -> bool:
    """`K/N`, two integers with 0 <= K < N (the --shard syntax); an empty spec means the whole stage."""
    if not spec:
        return True
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:  # not two parts, or a part that is not an integer
        return False
    return 0 <= index < count


@pytest.mark.slow
@FEW
@given(spec=st.text(max_size=12) | st.builds(lambda a, b: f"{a}/{b}", st.integers(-5, 10**20), st.integers(-5, 10**20)))
def test_shard_arguments(base, spec):
    before = snapshot(base)
    # A valid shard of the complete stage is up to date; any other spec is refused, naming the shard.
    if shard_is_valid(spec):
        assert_outcome(invoke("encode", base, "--shard", spec), 0)
    else:
        assert_outcome(invoke("encode", base, "--shard", spec), 2, "shard")
    assert snapshot(base) == before


FRAME_STAGES = ("encode", "invert", "flow", "decode", "eval")  # shardable, unit counts from frames/; no --name needed
IMAGE_STAGES = ("regularize", "sample")  # shardable, but need --name (and --images)


@pytest.mark.slow
@FEW
@given(stage=st.text(max_size=10) | st.sampled_from(["encode", "flow", "regularize", "sample"]),
       chunk=st.integers(-3, 10**20), per_shard=st.integers(-3, 10**20), shards=st.integers(-3, 10**6))
@example(stage="encode", chunk=1, per_shard=1, shards=1)  # the boundaries, every run: all valid,
@example(stage="encode", chunk=0, per_shard=1, shards=1)  # then a zero chunk size,
@example(stage="flow", chunk=1, per_shard=1, shards=0)  # then zero shards
def test_plan_and_missing_arguments(base, stage, chunk, per_shard, shards):
    before = snapshot(base)
    # Options first and `--` before STAGE: any text is the stage argument, never an option.
    # A frame stage plans with a chunk size >= 1 and >= 1 unit per shard; anything else is refused.
    plan_ok = stage in FRAME_STAGES and chunk >= 1 and per_shard >= 1
    assert_outcome(invoke("plan", base, "--chunk-frames", chunk, "--per-shard", per_shard, "--", stage),
                   0 if plan_ok else 2)
    # --missing lists the shards of a frame stage for a count of at least 1.
    missing_ok = stage in FRAME_STAGES and shards >= 1
    assert_outcome(invoke("status", base, "--shards", shards, "--missing", stage), 0 if missing_ok else 2)
    assert snapshot(base) == before


def size_is_valid(text: str) -> bool:
    """WxH, each side a positive multiple of 8 of at most 4096, or auto (the --size rule)."""
    if text.strip().lower() == "auto":
        return True
    match = re.fullmatch(r"\s*(-?\d+)\s*[xX]\s*(-?\d+)\s*", text)
    return bool(match) and all(0 < int(side) <= 4096 and int(side) % 8 == 0 for side in match.groups())


@pytest.mark.slow
@FEW
@given(size=st.text(max_size=12) | st.builds(lambda w, h: f"{w}x{h}", st.integers(-9, 10**9), st.integers(-9, 10**9))
       | st.builds(lambda w, h: f"{8 * w}x{8 * h}", st.integers(1, 512), st.integers(1, 512)),  # valid ones too
       chunk=st.integers(-3, 10**12), max_frames=st.integers(-3, 10**18))
@example(size="32x32", chunk=1, max_frames=0)  # the boundaries, every run: all valid,
@example(size=" Auto", chunk=1, max_frames=0)  # the aspect-keeping default, spelt loosely
@example(size="32x32", chunk=1, max_frames=-1)  # then a negative frame limit,
@example(size="32x32", chunk=0, max_frames=0)  # then chunks of zero frames
def test_init_arguments(tmp_path_factory, size, chunk, max_frames):
    root = tmp_path_factory.mktemp("init") / "proj"
    # A valid size, chunks of at least 1 frame and a frame limit of 0 (all) or more make a project;
    # anything else is refused and writes nothing.
    expected = 0 if size_is_valid(size) and chunk >= 1 and max_frames >= 0 else 2
    assert_outcome(invoke("init", root, "--size", size, "--chunk-frames", chunk, "--max-frames", max_frames), expected)
    assert (root / "vfx.toml").is_file() == (expected == 0)
