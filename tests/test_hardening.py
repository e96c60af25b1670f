"""Security and bad-input campaigns: malicious pickles, names and symlinks leaving the project,
and property-based (hypothesis) CLI arguments and malformed inputs. Every case exits 0 or 2 with
one clear line, never a traceback, and never changes an existing artifact.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import invoke
from test_bad_input import assert_bad, snapshot

FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 4-frame 32x32 project, extracted and encoded, that the property tests must leave untouched."""
    from vfx.media import synthetic_video

    folder = tmp_path_factory.mktemp("hardening")
    video = synthetic_video(folder / "clip.mp4", frames=4, size=32, fps=8)
    root = folder / "proj"
    for args in (("init", root, "--video", video, "--size", "32x32", "--chunk-frames", "2"), ("extract", root),
                 ("encode", root)):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    return root


def assert_clean(result, allowed=(0, 2)) -> None:
    """Exit 0 or 2; on 2, exactly one 'error:' line; never a traceback."""
    assert result.exit_code in allowed, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


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


MODEL_COMMANDS = [
    ("encode",), ("invert",), ("decode",), ("edit", "--prompt", "a cat"), ("tokens", "--name", "dog"),
    ("regularize", "--name", "dog", "--class-prompt", "a dog", "--num-images", "1"),
    ("sample", "--name", "dog", "--prompt", "a dog", "--base"),
    ("train", "--name", "dog", "--instance-prompt", "a sks dog"),
]


@pytest.mark.parametrize("suffix", ["ckpt", "pt"])
@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=lambda c: c[0])
def test_malicious_model_checkpoint_never_runs(base, tmp_path, command, suffix):
    ckpt, marker = malicious(tmp_path, f"model.{suffix}")
    before = snapshot(base)
    result = invoke(command[0], base, *command[1:], "--model", ckpt)
    assert result.exit_code == 2, result.output
    assert not marker.exists()
    assert snapshot(base) == before


def test_malicious_pipeline_folder_weights_never_run(base, tmp_path):
    from vfx.models import tiny_model_dir

    folder = tmp_path / "pipeline"
    shutil.copytree(tiny_model_dir("tiny"), folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    evil, marker = malicious(folder / "unet", "diffusion_pytorch_model.bin")
    assert_bad(invoke("encode", base, "--model", folder, "--force"), "--allow-pickle")
    assert not marker.exists()


@pytest.mark.parametrize("command", [("edit", "--prompt", "a cat"), ("sample", "--name", "dog", "--prompt", "a dog")],
                         ids=lambda c: c[0])
def test_malicious_lora_never_runs(base, tmp_path, command):
    lora, marker = malicious(tmp_path, "lora.pt")
    result = invoke(command[0], base, *command[1:], "--lora", lora)
    assert result.exit_code == 2, result.output
    assert not marker.exists()


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
    result = invoke(args[0], base, *args[1:])
    assert result.exit_code == 2, result.output
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


# ---------------------------------------------------------------- property-based bad input


@FEW
@given(data=st.binary(min_size=0, max_size=4000))
def test_random_bytes_as_video(base, tmp_path_factory, data):
    video = tmp_path_factory.mktemp("bytes") / "random.mp4"
    video.write_bytes(data)
    before = snapshot(base)
    result = invoke("extract", base, "--video", video)
    assert_clean(result, allowed=(2,))
    assert snapshot(base) == before


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"]


@FEW
@given(mode=st.sampled_from(MODES), width=st.integers(1, 40), height=st.integers(1, 40), count=st.integers(1, 3),
       fmt=st.sampled_from(["png", "jpg", "bmp", "tiff"]))
def test_images_of_odd_sizes_and_modes(tmp_path_factory, mode, width, height, count, fmt):
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
    assert_clean(invoke("extract", folder / "proj"))


# Text as it arrives from a non-UTF-8 argv: undecodable bytes become lone surrogates.
NON_UTF8 = st.text(min_size=1, max_size=20).map(lambda t: t + "\udcff") | st.binary(min_size=1, max_size=20).map(
    lambda b: (b + b"\xff").decode("utf-8", "surrogateescape"))


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


@FEW
@given(frames=st.integers(10**5 + 1, 10**30), size=st.integers(-10, 10**9))
def test_huge_frame_counts(tmp_path_factory, frames, size):
    out = tmp_path_factory.mktemp("huge") / "clip.mp4"
    assert_bad(invoke("demo-video", out, "--frames", frames, "--size", size))
    assert not out.exists()


@FEW
@given(spec=st.text(max_size=12) | st.builds(lambda a, b: f"{a}/{b}", st.integers(-5, 10**20), st.integers(-5, 10**20)))
def test_shard_arguments(base, spec):
    before = snapshot(base)
    assert_clean(invoke("encode", base, "--shard", spec))
    assert snapshot(base) == before  # the stage is up to date, or the shard is refused


@FEW
@given(stage=st.text(max_size=10) | st.sampled_from(["encode", "flow", "regularize", "sample"]),
       chunk=st.integers(-3, 10**20), per_shard=st.integers(-3, 10**20), shards=st.integers(-3, 10**6))
def test_plan_and_missing_arguments(base, stage, chunk, per_shard, shards):
    before = snapshot(base)
    assert_clean(invoke("plan", base, stage, "--chunk-frames", chunk, "--per-shard", per_shard))
    assert_clean(invoke("status", base, "--missing", stage, "--shards", shards))
    assert snapshot(base) == before


@FEW
@given(size=st.text(max_size=12) | st.builds(lambda w, h: f"{w}x{h}", st.integers(-9, 10**9), st.integers(-9, 10**9)),
       chunk=st.integers(-3, 10**12), max_frames=st.integers(-3, 10**18))
def test_init_arguments(tmp_path_factory, size, chunk, max_frames):
    root = tmp_path_factory.mktemp("init") / "proj"
    assert_clean(invoke("init", root, "--size", size, "--chunk-frames", chunk, "--max-frames", max_frames))
