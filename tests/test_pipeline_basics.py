"""extract -> encode -> decode on real and generated videos; idempotence, staleness, --force."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import zarr

from conftest import SHARED_VIDEO, invoke, ok, require_shared, run_cli, status_rows


def record(root: Path, folder: str) -> dict:
    return json.loads((root / folder / "stage.json").read_text())


def check_video(path: Path, frames: int, fps: Fraction) -> None:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert Fraction(stream.average_rate) == fps
        assert sum(1 for _ in container.decode(stream)) == frames


def test_round_trip_on_shared_video(tmp_path):
    video = require_shared(SHARED_VIDEO)
    root = tmp_path / "p"
    run_cli("init", root, "--video", video, "--size", "64x64", "--max-frames", "6", "--chunk-frames", "4")
    run_cli("extract", root)
    run_cli("encode", root)
    proc = run_cli("decode", root, "--json")
    result = json.loads(proc.stdout)
    assert result["state"] == "complete"
    frames = zarr.open_array(str(root / "frames" / "frames.zarr"))
    assert frames.shape == (6, 64, 64, 3) and frames.dtype == np.uint8
    assert record(root, "frames")["summary"]["source"]["has_audio"] is False
    latents = zarr.open_array(str(root / "latents" / "latents.zarr"))
    assert latents.shape == (6, 4, 8, 8) and latents.chunks == (4, 4, 8, 8)
    check_video(root / "decoded" / "source" / "video.mp4", 6, Fraction(20))


def test_round_trip_on_generated_video_with_png(encoded):
    result = invoke("decode", encoded, "--png")
    assert result.exit_code == 0, result.output
    out = encoded / "decoded" / "source"
    check_video(out / "video.mp4", 12, Fraction(12))
    assert len(list((out / "png").glob("*.png"))) == 12
    decoded = zarr.open_array(str(out / "frames.zarr"))
    assert decoded.shape == (12, 64, 64, 3)


def test_extract_image_folder_and_selection(tmp_path, project):
    from conftest import image_folder, textured

    folder = image_folder(tmp_path / "imgs", [textured(80, seed=i)[:, :72] for i in range(10)])
    result = invoke("extract", project, "--video", folder, "--size", "32x32", "--stride", "3", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["frames"] == 4  # frames 0, 3, 6, 9
    assert Fraction(summary["fps"]) == Fraction(24, 3)
    arr = zarr.open_array(str(project / "frames" / "frames.zarr"))
    assert arr.shape == (4, 32, 32, 3)


def test_extract_start_end_seconds_and_max_frames(project):
    result = invoke("extract", project, "--start", "2", "--end", "0.75s", "--max-frames", "5", "--json")
    assert result.exit_code == 0, result.output
    # 12 fps: frames 2..8 lie before 0.75 s; max-frames keeps 5 of them.
    assert json.loads(result.stdout)["frames"] == 5


def test_second_run_is_a_no_op_then_stale_then_force(encoded):
    before = record(encoded, "latents")
    marker_times = {p.name: p.stat().st_mtime_ns for p in (encoded / "latents" / ".done").iterdir()}
    result = invoke("encode", encoded, "--json")
    assert json.loads(result.stdout)["up_to_date"] is True
    assert record(encoded, "latents") == before
    assert {p.name: p.stat().st_mtime_ns for p in (encoded / "latents" / ".done").iterdir()} == marker_times

    # A changed upstream (frames re-extracted at another size) makes latents stale.
    assert invoke("extract", encoded, "--size", "32x32").exit_code == 0
    assert status_rows(encoded)["latents"]["state"] == "stale"
    result = invoke("encode", encoded, "--json")
    assert json.loads(result.stdout)["computed_units"] == 3
    assert zarr.open_array(str(encoded / "latents" / "latents.zarr")).shape == (12, 4, 4, 4)

    # --force recomputes although nothing changed.
    fp = record(encoded, "latents")["fingerprint"]
    result = invoke("encode", encoded, "--force", "--json")
    assert json.loads(result.stdout)["computed_units"] == 3
    assert record(encoded, "latents")["fingerprint"] == fp


def test_status_reports_missing_partial_complete(project):
    rows = status_rows(project)
    assert rows["frames"]["state"] == "missing" and "vfx extract" in rows["frames"]["hint"]
    ok("extract", project)
    ok("encode", project, "--shard", "0/3")
    rows = status_rows(project)
    assert rows["frames"]["state"] == "complete"
    assert rows["latents"]["state"] == "partial" and (rows["latents"]["done"], rows["latents"]["units"]) == (1, 3)
    # The table shows the same row: folder, stage, state, chunks.
    table = {line.split()[0]: line.split() for line in invoke("status", project).stdout.splitlines() if line.split()}
    assert table["latents"][1:4] == ["encode", "partial", "1/3"]


def test_inspect_and_preview(encoded, tmp_path):
    result = invoke("inspect", encoded / "latents", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["arrays"]["latents.zarr"]["shape"] == [12, 4, 8, 8]
    assert info["record"]["stage"] == "encode"
    for folder in ("frames", "latents"):
        png = tmp_path / f"{folder}.png"
        assert invoke("inspect", encoded / folder, "--preview", png).exit_code == 0
        from PIL import Image

        with Image.open(png) as image:
            assert image.size[0] > 64 and np.asarray(image).std() > 0


def test_tiny_model_is_deterministic(tmp_path):
    for name in ("a", "b"):
        result = invoke("model", "tiny", tmp_path / name)
        assert result.exit_code == 0, result.output
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and any(str(f).endswith(".safetensors") for f in files_a)
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_tiny_model_is_sd_shaped():
    from vfx.models import tiny_model_dir
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir("tiny"))
    unet = pipe.unet
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert all(len(b.resnets) == 2 for b in unet.down_blocks)
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8
    assert pipe.scheduler.config.prediction_type == "epsilon"
    v_pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir("tiny-v"))
    assert v_pipe.scheduler.config.prediction_type == "v_prediction"
    assert v_pipe.unet.config.use_linear_projection is True
