"""Rotation metadata, resize policy and frame selection."""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import numpy as np

import zarr

from conftest import make_video, ok
from vfx.media import Selection, apply_rotation, iter_source, probe, resize_frame, target_size


def test_display_rotation_is_undone():
    image = np.zeros((2, 3, 3), np.uint8)
    image[0, 0] = 255  # top-left marker
    # FFmpeg reports a phone's "rotate=90" as a display matrix of -90 degrees: turn clockwise.
    clockwise = apply_rotation(image, -90)
    assert clockwise.shape == (3, 2, 3) and clockwise[0, 1, 0] == 255
    counter = apply_rotation(image, 90)
    assert counter.shape == (3, 2, 3) and counter[2, 0, 0] == 255
    assert apply_rotation(image, 180)[1, 2, 0] == 255
    assert apply_rotation(image, 0) is image


def test_rotated_source_frames_come_out_upright(tmp_path):
    frame = np.zeros((32, 64, 3), np.uint8)
    frame[:, :32] = 255  # left half white
    info = probe(make_video(tmp_path / "wide.mp4", [frame] * 3))
    rotated = replace(info, rotation=-90.0)
    frames = [f for _, _, f in iter_source(rotated)]
    assert len(frames) == 3 and frames[0].shape == (64, 32, 3)
    assert frames[0][:16].mean() > 200 and frames[0][-16:].mean() < 50  # the white half is now on top
    assert target_size(32, 64, None, 32) == (32, 64)


def test_resize_policy_covers_then_crops_the_centre():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 90:110] = 255  # a centred stripe
    out = resize_frame(image, 64, 64)
    assert out.shape == (64, 64, 3)
    assert out[:, 28:36].mean() > 200 and out[:, :8].mean() == 0
    assert target_size(1920, 1080, None, 384) == (680, 384)


def test_default_size_keeps_the_aspect_ratio_and_never_upscales():
    assert target_size(1920, 1080, "auto", None, native=512) == (912, 512)  # 16:9, long side rounded to 8
    assert target_size(1080, 1920, None, None, native=768) == (768, 1368)  # portrait, a 768 model
    assert target_size(320, 180, "auto", None, native=512) == (312, 176)  # the source's short side, to a multiple of 8
    assert target_size(1920, 1080, (512, 512), None, "contain") == (512, 288)  # fits inside the box
    assert target_size(1920, 1080, (512, 512), None, "stretch") == (512, 512)
    assert target_size(1920, 1080, (512, 512), None, "cover") == (512, 512)


def test_stretch_keeps_the_whole_frame_cover_crops_it():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, :10] = 255  # a stripe at the left edge
    assert resize_frame(image, 64, 64, "stretch")[:, :2].mean() > 200
    assert resize_frame(image, 64, 64, "cover")[:, :2].mean() == 0


def wide_clip(path):
    frame = np.full((72, 128, 3), 90, np.uint8)
    frame[:, :8], frame[:, -8:] = 255, 0  # white at the left edge, black at the right
    return make_video(path, [frame] * 3)


def test_a_wide_video_keeps_its_whole_frame_by_default(tmp_path):
    root = tmp_path / "p"
    ok("init", root, "--video", wide_clip(tmp_path / "wide.mp4"))
    assert 'size = "auto"' in (root / "vfx.toml").read_text()
    ok("extract", root)
    frames = zarr.open_array(root / "frames" / "frames.zarr", mode="r")[:]
    # The tiny model's native side is 64: 128x72 -> 64 high, 113.8 wide -> 112, edges kept.
    assert frames.shape == (3, 64, 112, 3)
    assert frames[:, :, :2].mean() > 200 and frames[:, :, -2:].mean() < 40


def test_a_project_keeps_the_size_its_vfx_toml_records(tmp_path):
    root = tmp_path / "p"
    ok("init", root, "--video", wide_clip(tmp_path / "wide.mp4"), "--size", "64x64")
    ok("extract", root)
    assert zarr.open_array(root / "frames" / "frames.zarr", mode="r").shape == (3, 64, 64, 3)
    ok("extract", root, "--size", "64x64", "--fit", "contain", "--force")
    assert zarr.open_array(root / "frames" / "frames.zarr", mode="r").shape == (3, 40, 64, 3)


def test_fps_resampling_keeps_the_requested_rate():
    frames = ((i, i / 30, np.full((1,), i)) for i in range(60))  # 2 s at 30 fps
    kept = [int(f[0]) for f in Selection(fps=10).select(frames)]
    assert kept == list(range(0, 60, 3))
    assert Selection(fps=10).output_fps(Fraction(30)) == 10


def test_the_same_frames_encode_to_the_same_bytes_whatever_the_heap_holds(tmp_path):
    """libx264's macroblock-tree rate control read memory it had not written: the same 12 frames
    encoded to one of several byte streams, depending on what earlier allocations left (measured with
    it on: 4 distinct outputs in these 20 encodes). With it off, every encode is the same."""
    import hashlib
    import os

    from vfx.media import write_mp4

    from vfx.media import synthetic_video

    clip = synthetic_video(tmp_path / "source.mp4", frames=12, size=64, fps=12)
    frames = [frame for _, _, frame in iter_source(probe(clip))]
    digests, kept = set(), []
    for attempt in range(20):
        scraps = [os.urandom(int(n)) for n in np.random.default_rng(attempt).integers(1_000, 200_000, 40)]
        kept.append(scraps[::7])  # keep some, free the rest: each encode finds another heap
        del scraps
        write_mp4(tmp_path / "clip.mp4", frames, Fraction(12))
        digests.add(hashlib.sha256((tmp_path / "clip.mp4").read_bytes()).hexdigest())
    assert len(digests) == 1
