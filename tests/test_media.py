"""Rotation metadata, resize policy and frame selection."""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import numpy as np

from conftest import make_video
from vfx.media import Selection, apply_rotation, iter_source, probe, resize_cover, target_size


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
    out = resize_cover(image, 64, 64)
    assert out.shape == (64, 64, 3)
    assert out[:, 28:36].mean() > 200 and out[:, :8].mean() == 0
    assert target_size(1920, 1080, None, 384) == (680, 384)


def test_fps_resampling_keeps_the_requested_rate():
    frames = ((i, i / 30, np.full((1,), i)) for i in range(60))  # 2 s at 30 fps
    kept = [int(f[0]) for f in Selection(fps=10).select(frames)]
    assert kept == list(range(0, 60, 3))
    assert Selection(fps=10).output_fps(Fraction(30)) == 10
