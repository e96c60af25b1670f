"""Bad input: exit 2, one readable line on stderr, and nothing already on disk changed."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from conftest import SHARED_VIDEO, assert_bad, invoke, run_cli, snapshot


@pytest.fixture
def extracted(encoded) -> Path:
    return encoded


def zero_frame_video(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    return path


def bad_videos(tmp_path: Path) -> dict[str, Path]:
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.mp4"
    source = SHARED_VIDEO if SHARED_VIDEO.exists() else None
    if source is None:
        from vfx.media import synthetic_video

        source = synthetic_video(tmp_path / "src.mp4", frames=30, size=64)
    data = source.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    junk_dir = tmp_path / "junk"
    junk_dir.mkdir()
    (junk_dir / "0.png").write_bytes(b"not a png")
    return {
        "missing": tmp_path / "nope.mp4",
        "not a video": noise,
        "truncated": truncated,
        "zero frames": zero_frame_video(tmp_path / "zero.mp4"),
        "no images": empty_dir,
        "unreadable image": junk_dir,
    }


def test_bad_videos_leave_frames_untouched(extracted, tmp_path):
    before = snapshot(extracted)
    for label, video in bad_videos(tmp_path).items():
        result = invoke("extract", extracted, "--video", video)
        assert_bad(result, video.name)  # the message names the input it refuses
        assert snapshot(extracted) == before, label


@pytest.mark.parametrize("size", ["0x64", "-8x64", "64x0", "63x64", "8192x64", "64", "axb"])
def test_unreachable_sizes(extracted, size):
    before = snapshot(extracted)
    assert_bad(invoke("extract", extracted, "--size", size), "size")
    assert snapshot(extracted) == before


@pytest.mark.parametrize("args", [["--short-side", "0"], ["--short-side", "5000"], ["--stride", "0"],
                                  ["--fps", "-1"], ["--start", "abc"], ["--size", "64x64", "--short-side", "64"],
                                  ["--fit", "crop"]])
def test_bad_selection(extracted, args):
    before = snapshot(extracted)
    assert_bad(invoke("extract", extracted, *args))
    assert snapshot(extracted) == before


def test_start_past_the_end_selects_nothing(extracted):
    before = snapshot(extracted)
    assert_bad(invoke("extract", extracted, "--start", "500"), "no frames")
    assert snapshot(extracted) == before


@pytest.mark.parametrize("model,words", [
    ("/no/such/model", ["'/no/such/model' not found"]),
    ("weights/sd15.safetensors", ["not found"]),
    ("someone/not-cached-model", ["not in the local Hugging Face cache"]),
    ("no such model", ["unknown model"]),
])
def test_unknown_models(extracted, model, words):
    before = snapshot(extracted)
    assert_bad(invoke("encode", extracted, "--model", model, "--force"), *words)
    assert snapshot(extracted) == before


def test_pickle_checkpoint_needs_opt_in(extracted, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04not really")
    assert_bad(invoke("encode", extracted, "--model", ckpt), ckpt.name, "pickle", "--allow-pickle")


def test_stage_before_its_upstream_names_the_command(project):
    assert_bad(invoke("encode", project), "vfx extract")
    assert_bad(invoke("decode", project), "vfx encode")
    assert_bad(invoke("invert", project), "vfx encode")


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", ""])
def test_names_cannot_leave_the_project(extracted, name):
    before = snapshot(extracted)
    assert_bad(invoke("decode", extracted, "--edit", name), "name")
    assert snapshot(extracted) == before
    assert not (extracted.parent / "x").exists()


@pytest.mark.parametrize("spec", ["3/2", "0/0", "1", "a/b", "-1/3"])
def test_bad_shard_specs(extracted, spec):
    before = snapshot(extracted)
    assert_bad(invoke("encode", extracted, "--shard", spec, "--force"), "shard")
    assert snapshot(extracted) == before


def test_not_a_project(tmp_path):
    assert_bad(invoke("status", tmp_path), "not a vfx project", "vfx init")
    assert_bad(invoke("extract", tmp_path / "missing"), "not a directory")


def test_init_refuses_to_overwrite(project):
    before = (project / "vfx.toml").read_text()
    assert_bad(invoke("init", project, "--size", "32x32"), "--force")
    assert (project / "vfx.toml").read_text() == before


def test_real_process_exit_code_and_single_line(tmp_path):
    proc = run_cli("encode", tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:")
    assert proc.stdout == ""


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli("--debug", "encode", tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" in proc.stderr
