"""The depth model: the embedded tiny-depth (shaped like stable-diffusion-2-depth), `vfx depth` against the
diffusers depth pipeline's own maps, the maps reaching every UNet call of invert and edit, and the
video stages' guarantees on a depth model."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
import zarr

from conftest import EDIT_STEPS as STEPS
from conftest import (
    assert_bad, assert_every_frame_edited, assert_killed_edit_resumes, assert_static_edit, chunk_files,
    copy_project, done_markers, image_folder, invoke, kill_after_markers, ok, ok_json, run_shards, textured,
    status_rows, tiny_pipe, vfx_command, video_project,
)

EPS32 = float(np.finfo(np.float32).eps)
OPTIONS = ("--prompt", "a red robot", "--steps", "2")


def pan(count: int, seed: int, size: int = 64) -> list[np.ndarray]:
    return [np.roll(textured(size, seed=seed), 4 * k, axis=1) for k in range(count)]


def depth_project(tmp_path, frames, name: str = "p", chunk: int = 4, steps: int = STEPS, invert: bool = True):
    """A tiny-depth project on `frames`: extracted, encoded, depth estimated and (by default) inverted."""
    folder = image_folder(tmp_path / f"{name}-frames", frames)
    size = f"{frames[0].shape[1]}x{frames[0].shape[0]}"
    stages = ["extract", "encode", "depth"]
    if invert:
        stages.append(("invert", "--steps", steps, "--save-steps", steps, "--no-reconstruction"))
    return video_project(tmp_path / name, folder, "--size", size, "--chunk-frames", str(chunk), "--model", "tiny-depth",
                         stages=tuple(stages))


def depth_of(root) -> np.ndarray:
    return np.asarray(zarr.open_array(str(root / "depth" / "depth.zarr")))


# ---------------------------------------------------------------- the model and its maps


def test_tiny_depth_is_shaped_like_sd2_depth(tmp_path):
    from diffusers import StableDiffusionDepth2ImgPipeline
    from safetensors.torch import save_file
    from transformers import DPTForDepthEstimation

    from vfx.models import model_family, resolve_model, tiny_model_dir

    folder = tiny_model_dir("tiny-depth")
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(folder)
    assert pipe.unet.config.in_channels == 5 and pipe.unet.config.out_channels == 4
    assert isinstance(pipe.depth_estimator, DPTForDepthEstimation)
    assert pipe.scheduler.config.prediction_type == "epsilon"  # as stable-diffusion-2-depth
    assert model_family(resolve_model("tiny-depth")) == "depth" and model_family(resolve_model("tiny-v")) == "sd"
    # A single file is told by its first convolution's input channels (header only).
    for channels, family in ((5, "depth"), (4, "sd")):
        path = tmp_path / f"c{channels}.safetensors"
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, channels, 3, 3)}, str(path))
        assert model_family(resolve_model(str(path))) == family


def test_depth_maps_are_the_depth_pipelines(tmp_path):
    """`vfx depth` on 64x96 frames gives what StableDiffusionDepth2ImgPipeline.prepare_depth_map gives
    for the same frames as PIL images (whose size it reads right)."""
    from diffusers import StableDiffusionDepth2ImgPipeline
    from PIL import Image

    from vfx.models import tiny_model_dir

    frames = [textured(96, seed=s)[16:80] for s in range(3)]
    root = depth_project(tmp_path, frames, invert=False)
    ours = depth_of(root)
    assert ours.shape == (3, 1, 8, 12) and ours.dtype == np.float32
    assert (ours.min(axis=(1, 2, 3)) == -1).all() and (ours.max(axis=(1, 2, 3)) == 1).all()
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_model_dir("tiny-depth"))
    stored = np.asarray(zarr.open_array(str(root / "frames" / "frames.zarr")))
    with torch.no_grad():
        theirs = pipe.prepare_depth_map([Image.fromarray(f) for f in stored], None, 3, False, torch.float32,
                                        torch.device("cpu")).numpy()
    # Same ops on the same pixels, batched alike: float32 rounding of maps in [-1, 1] (measured: exact).
    assert np.abs(ours - theirs).max() <= 4 * EPS32


def test_the_depth_stage_options_and_its_bad_input(tmp_path):
    from vfx.models import tiny_model_dir

    root = depth_project(tmp_path, pan(3, 2), invert=False)
    maps = lambda: {k: v for k, v in chunk_files(root / "depth" / "depth.zarr").items() if k.startswith("c/")}  # noqa: E731
    before = maps()
    assert ok_json("depth", root)["up_to_date"]
    dpt = tmp_path / "dpt"  # the model's own estimator as a plain DPT folder: the same maps, another identity
    shutil.copytree(tiny_model_dir("tiny-depth") / "depth_estimator", dpt)
    shutil.copy(tiny_model_dir("tiny-depth") / "feature_extractor" / "preprocessor_config.json", dpt)
    result = ok_json("depth", root, "--depth-model", dpt)
    assert not result["up_to_date"] and maps() == before
    record = json.loads((root / "depth" / "stage.json").read_text())
    assert str(dpt.resolve()) in record["params"]["depth_model"]
    (tmp_path / "empty").mkdir()
    for bad_args, words in ((("--depth-model", tmp_path / "empty"), ("not a DPT",)),
                            (("--depth-model", tmp_path / "nowhere"), ("no such folder",)),
                            (("--batch-size", "0"), ("--batch-size",)),
                            (("--model", "tiny"), ("depth_estimator", "--depth-model"))):
        assert_bad(invoke("depth", root, *bad_args), *words)
    assert maps() == before  # nothing lost to a refused command


def test_invert_and_edit_without_depth_name_the_command(tmp_path):
    root = depth_project(tmp_path, pan(2, 3), invert=False)
    shutil.rmtree(root / "depth")
    assert_bad(invoke("invert", root, "--steps", STEPS, "--save-steps", STEPS), f"vfx depth {root}")
    assert not (root / "inversion").exists()
    ok("depth", root)
    ok("invert", root, "--steps", STEPS, "--save-steps", STEPS, "--no-reconstruction")
    shutil.rmtree(root / "depth")
    assert_bad(invoke("edit", root, "--prompt", "x", "--steps", STEPS), f"vfx depth {root}")
    assert not (root / "edits").exists()


def test_status_lists_depth_before_the_inversion_of_a_depth_model(tmp_path):
    root = depth_project(tmp_path, pan(2, 3), invert=False)
    shutil.rmtree(root / "depth")
    rows = status_rows(root)
    assert list(rows)[:5] == ["frames", "latents", "depth", "inversion", "flow"]
    assert rows["depth"]["state"] == "missing" and rows["depth"]["hint"] == f"vfx depth {root}"


def test_every_unet_call_reads_the_frames_depth(tmp_path):
    """Channel 5 of every UNet input is the depth map of that row's frame: in each inversion call, and
    in each edit call in all three branches [source | uncond | cond]."""
    from vfx.settings import Settings
    from vfx.stages.edit import edit
    from vfx.stages.edit_config import EditConfig
    from vfx.stages.invert import invert

    root = depth_project(tmp_path, pan(5, 4), invert=False)
    depth = torch.from_numpy(depth_of(root))
    settings = Settings.resolve(root)
    seen = []
    settings.pipeline().unet.register_forward_pre_hook(lambda module, args: seen.append(args[0][:, 4:].clone()))

    def frame_of(row: torch.Tensor) -> int:
        matches = [f for f in range(len(depth)) if torch.equal(row, depth[f])]
        assert len(matches) == 1
        return matches[0]

    invert(settings, STEPS, STEPS, batch_size=8, reconstruction=False, method="ddim")
    assert len(seen) == 2 * STEPS  # 2 chunks (of 4 and 1 frames), one call per step each
    for call in seen:
        assert [frame_of(row) for row in call] in ([0, 1, 2, 3], [4])
    seen.clear()
    edit(settings, EditConfig("a red robot", "e", steps=STEPS))
    frames_seen = set()
    for call in seen:
        source, uncond, cond = call.chunk(3)
        assert torch.equal(source, uncond) and torch.equal(uncond, cond)
        frames_seen.update(frame_of(row) for row in source)
    assert frames_seen == set(range(5))


def test_the_depth_map_changes_the_unet_output():
    from vfx.diffusion.text import encode_prompt
    from vfx.stages.invert import unet_eval

    pipe = tiny_pipe("tiny-depth")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    depth = torch.rand(2, 1, 8, 8, generator=generator) * 2 - 1
    embedding = encode_prompt(pipe, "a photo")
    with torch.no_grad():
        near, far = unet_eval(pipe.unet, latents, 500, embedding, depth), unet_eval(pipe.unet, latents, 500, embedding, -depth)
    # Far beyond rounding (measured: 67% of the output's scale).
    assert float((near - far).abs().max()) > 1e-2 * float(near.abs().max())


# ---------------------------------------------------------------- guarantees on a depth model


def test_static_video_edits_to_identical_frames(tmp_path):
    root = depth_project(tmp_path, [textured(64, seed=3)] * 6)
    assert np.array_equal(depth_of(root)[1:], np.broadcast_to(depth_of(root)[0], (5, 1, 8, 8)))
    assert_static_edit(root)


@pytest.mark.parametrize("count", [1, 9])
def test_every_frame_count_produces_every_frame(tmp_path, count):
    assert_every_frame_edited(depth_project(tmp_path, pan(count, 1)), count)


@pytest.mark.slow
def test_killed_depth_and_edit_resume_to_identical_bytes_and_shards_equal_one_process(tmp_path):
    clean = depth_project(tmp_path, pan(6, 9), name="clean", chunk=1, steps=10)
    ok("edit", clean, "--prompt", "a red robot", "--steps", "10", "--name", "k")
    root = copy_project(clean, tmp_path / "proj", ("frames", "latents"))
    rng = random.Random("depth-campaign")
    command = vfx_command("depth", root)
    for _ in range(3):
        kill_after_markers(command, root / "depth", done_markers(root / "depth") + rng.randint(0, 2), timeout=120,
                           jitter=rng.uniform(0, 0.05))
    run_shards(command)
    assert chunk_files(root / "depth" / "depth.zarr") == chunk_files(clean / "depth" / "depth.zarr")
    ok("invert", root, "--steps", "10", "--save-steps", "10", "--no-reconstruction")
    assert_killed_edit_resumes(root, clean)


def test_run_estimates_depth_for_a_depth_model(tmp_path, gen_video):
    root = tmp_path / "p"
    ok("run", root, gen_video, *OPTIONS, "--size", "32x32", "--max-frames", "4", "--model", "tiny-depth")
    record = json.loads((root / "inversion" / "stage.json").read_text())
    assert "depth/depth.zarr" in record["inputs"] and (root / "report" / "index.html").is_file()
    depth_record = (root / "depth" / "stage.json").read_bytes()
    ok("run", root, *OPTIONS)  # up to date: nothing recomputed
    assert (root / "depth" / "stage.json").read_bytes() == depth_record


def test_dreambooth_refuses_a_depth_model_but_samples_a_run_trained_on_another(tmp_path):
    root = tmp_path / "db"
    ok("init", root, "--model", "tiny-depth")
    photos = image_folder(tmp_path / "photos", [textured(64, seed=s) for s in range(2)])
    for command in (("regularize", "--name", "c", "--class-prompt", "a photo of a dog"),
                    ("train", "--name", "t", "--instance-dir", photos, "--instance-prompt", "a photo of sks dog"),
                    ("sample", "--name", "t", "--base", "--prompt", "a photo of sks dog")):
        assert_bad(invoke(command[0], root, *command[1:]), "depth model")
    assert not (root / "dreambooth").exists()
    # a run trained on a text-to-image model samples that model, whatever the project's own model is
    ok("train", root, "--name", "t", "--instance-dir", photos, "--instance-prompt", "a photo of sks dog", "--mode",
       "lora", "--max-steps", "1", "--resolution", "32", "--model", "tiny")
    sample = ("--prompt", "a photo of sks dog", "--num-images", "1", "--steps", "2")
    ok("sample", root, "--name", "t", *sample)
    ok("sample", root, "--name", "t", "--base", *sample)
    records = [json.loads((root / "dreambooth" / "t" / folder / "stage.json").read_text())
               for folder in ("samples", "samples-base")]
    assert all(r["params"]["model"].startswith("tiny@") for r in records)
    assert_bad(invoke("sample", root, "--name", "t", "--base", "--model", "tiny-depth", *sample), "depth model")
