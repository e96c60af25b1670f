"""Photos as people take them: EXIF orientation, HEIC/AVIF, files that are not images, few or small photos."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import DOG_PHOTOS, invoke, ok, require_shared, textured
from dreambooth_helpers import make_project, run_dir, train_args
from vfx.errors import BadInput
from vfx.media import image_files, read_image

ORIENTATION = 0x0112
# What each EXIF orientation asks a viewer to do to the stored pixels, as numpy on [H, W, C] arrays,
# and its inverse (what a camera does when it stores an upright picture under that tag).
SHOW = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}
STORE = {**SHOW, 6: SHOW[8], 8: SHOW[6]}  # every other one undoes itself


def save_with_orientation(path, upright: np.ndarray, orientation: int, **options) -> None:
    """`upright` stored the way a camera does under `orientation`, with the tag that undoes it."""
    image = Image.fromarray(np.ascontiguousarray(STORE[orientation](upright)))
    exif = image.getexif()
    exif[ORIENTATION] = orientation
    image.save(path, exif=exif.tobytes(), **options)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_reads_upright(tmp_path, orientation):
    upright = np.ascontiguousarray(textured(48, 3)[:, :32])  # 48 tall, 32 wide: a portrait
    path = tmp_path / "photo.png"
    save_with_orientation(path, upright, orientation)
    np.testing.assert_array_equal(read_image(path), upright)


def test_a_portrait_phone_jpeg_reads_upright(tmp_path):
    photo = read_image(sorted(require_shared(DOG_PHOTOS).iterdir())[0])
    portrait = np.ascontiguousarray(np.rot90(photo)) if photo.shape[1] > photo.shape[0] else photo
    path = tmp_path / "IMG_0001.jpg"
    save_with_orientation(path, portrait, 6, quality=95)
    assert Image.open(path).size == (portrait.shape[0], portrait.shape[1])  # stored sideways
    read = read_image(path)
    assert read.shape == portrait.shape
    assert psnr(read, portrait) > 30  # JPEG at quality 95 is ~40 dB; a wrong rotation is ~10 dB


@pytest.mark.parametrize("suffix, options", [(".heic", {"quality": -1, "chroma": 444}),
                                             (".avif", {"quality": 100, "subsampling": "4:4:4"})])
def test_heic_and_avif_photos_are_read(tmp_path, suffix, options):
    upright = textured(64, 5)
    path = tmp_path / f"IMG_0002{suffix}"
    Image.fromarray(upright).save(path, **options)  # (near-)lossless, so the pixels can be compared
    difference = np.abs(read_image(path).astype(int) - upright)
    assert difference.max() <= 4  # the YCbCr round trip rounds by a few levels; another image differs by ~100


def test_an_unreadable_photo_is_refused_by_name(tmp_path):
    path = tmp_path / "IMG_0003.heic"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 40)
    with pytest.raises(BadInput, match="IMG_0003.heic"):
        read_image(path)


def test_files_that_are_not_images_are_named_not_skipped_silently(tmp_path, capsys):
    Image.fromarray(textured(32, 1)).save(tmp_path / "a.jpg")
    Image.fromarray(textured(32, 2)).save(tmp_path / "b.heic")
    (tmp_path / "c.jxl").write_bytes(b"not yet")
    (tmp_path / "notes.txt").write_text("where the photos were taken")
    assert [p.name for p in image_files(tmp_path)] == ["a.jpg", "b.heic"]
    warning = capsys.readouterr().err
    assert "c.jxl" in warning and "notes.txt" not in warning


def test_training_reads_phone_photos_upright_records_them_and_warns(tmp_path):
    root = make_project(tmp_path / "proj")
    photos = tmp_path / "photos"
    photos.mkdir()
    portrait = np.ascontiguousarray(textured(96, 7)[:, :72])
    save_with_orientation(photos / "IMG_0001.jpg", portrait, 6, quality=95)
    Image.fromarray(textured(48, 8)).save(photos / "IMG_0002.heic", quality=95)
    result = ok(*train_args(root, "phone", photos, "--resolution", "64", steps=1))
    assert "only 2 instance photo(s)" in result.stderr
    upscaled = result.stderr.split("upscaled")[1]
    assert "IMG_0002.heic 48x48 (x1.33)" in upscaled and "IMG_0001.jpg" not in upscaled
    record = json.loads((run_dir(root, "phone") / "weights" / "stage.json").read_text())
    assert record["summary"]["photos"] == [
        {"file": "IMG_0001.jpg", "width": 72, "height": 96},
        {"file": "IMG_0002.heic", "width": 48, "height": 48},
    ]


def test_an_unreadable_photo_stops_training_before_anything_is_written(tmp_path):
    root = make_project(tmp_path / "proj")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(textured(64, 1)).save(photos / "a.jpg")
    (photos / "b.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 40)
    result = invoke(*train_args(root, "bad", photos, steps=1))
    assert result.exit_code == 2 and "b.heic" in result.stderr
    assert not run_dir(root, "bad").exists()
