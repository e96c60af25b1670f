"""DreamBooth on SDXL (tiny-xl): micro-conditioning of every training example, both text encoders trained,
exact resume, and the weights and exports loaded by diffusers' own SDXL loaders giving vfx's samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import ok
from dreambooth_helpers import (
    CLASS_PROMPT, PROMPT, assert_same_tensors, make_photos, make_project, run_dir, train_args, trained_tensors,
    with_prior,
)
from vfx.media import read_image

STEPS, SIDE = 2, 64
SAMPLE = ["--prompt", PROMPT, "--num-images", "1", "--steps", str(STEPS)]


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """A tiny-xl project with class images, a LoRA run and a full run (both text encoders trained), each
    sampled once by vfx."""
    base = tmp_path_factory.mktemp("xl")
    root = make_project(base / "proj", model="tiny-xl")
    photos = make_photos(base / "photos", 2)
    ok("regularize", root, "--name", "lora", "--class-prompt", CLASS_PROMPT, "--num-images", "2", "--steps", "2")
    ok(*train_args(root, "lora", photos, "--mode", "lora", "--train-text-encoder", "--learning-rate", "1e-2",
                   "--class-prompt", CLASS_PROMPT, steps=2))
    ok(*train_args(root, "full", photos, "--train-text-encoder", steps=1))
    for name in ("lora", "full"):
        ok("sample", root, "--name", name, *SAMPLE)
    return root, photos


def sampled(root, name: str) -> np.ndarray:
    return read_image(run_dir(root, name) / "samples" / "000-000.png")


def image_of(pipe) -> np.ndarray:
    from vfx.dreambooth.images import generate

    return generate(pipe, [PROMPT], [0], steps=STEPS, guidance=7.5, width=SIDE, height=SIDE)[0]


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    # Another loader may order the same float32 sums differently: at most 1/255 apart.
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1


def base_pipe():
    from diffusers import StableDiffusionXLPipeline

    from vfx.models import tiny_model_dir

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir("tiny-xl")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- micro-conditioning


def test_a_drawn_crop_is_where_the_example_shows_it():
    """The reported top-left is the crop's place in the scaled image as the example shows it: in the
    mirrored image when the example is mirrored (as SDXL's trainer crops after flipping)."""
    from vfx.dreambooth.data import ImageSet, to_tensor

    image = np.random.default_rng(0).integers(0, 255, (12, 20, 3), dtype=np.uint8)
    moving = ImageSet.from_arrays([image], 8, random_crop=True, flip=True)
    assert moving.sizes == [(12, 20)]
    scaled = moving.images[0]
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(30):
        pixels, (top, left) = moving.draw(0, generator)
        plain = to_tensor(scaled[top : top + 8, left : left + 8])
        mirrored = to_tensor(scaled[:, ::-1][top : top + 8, left : left + 8])
        assert torch.equal(pixels, plain) or torch.equal(pixels, mirrored)
        seen.add(torch.equal(pixels, mirrored) and not torch.equal(pixels, plain))
    assert seen == {True, False}  # both mirrored and plain examples were drawn
    fixed = ImageSet.from_arrays([image], 8)
    assert fixed.draw(0)[1] == fixed.centre_crop(0) == ((scaled.shape[0] - 8) // 2, (scaled.shape[1] - 8) // 2)


def test_every_training_call_gets_each_examples_size_and_crop(tmp_path, monkeypatch):
    """SDXL's time ids reach the UNet per example: the photo's original (h, w), its crop's top-left after
    scaling, the target size; class images (generated at the training size) give (r, r, 0, 0, r, r)."""
    import vfx.dreambooth.train as train_module
    from vfx.settings import Settings

    root = make_project(tmp_path / "proj", model="tiny-xl")
    photos = make_photos(tmp_path / "photos", 2)  # 80 x 72 (h x w)
    ok("regularize", root, "--name", "t", "--class-prompt", CLASS_PROMPT, "--num-images", "2", "--steps", "2")
    seen = []
    loader = train_module.load_pipeline

    def hooked(*args, **kwargs):
        pipe = loader(*args, **kwargs)
        pipe.unet.register_forward_pre_hook(
            lambda module, a, kw: seen.append(kw["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True)
        return pipe

    monkeypatch.setattr(train_module, "load_pipeline", hooked)
    from vfx.dreambooth.config import TrainConfig

    cfg = TrainConfig(name="t", instance_dir=photos, instance_prompt=PROMPT, class_prompt=CLASS_PROMPT, max_steps=3,
                      checkpoint_every=3, random_crop=True, flip=True, resolution=SIDE, eval_pairs=0)
    train_module.train(Settings.resolve(root), cfg)
    assert len(seen) == 3  # one call a step: one instance and one class example
    # The 80x72 photos scale to 71x64: a random crop starts at rows 0-7, column 0 (mirrored: 0 too).
    for ids in seen:
        assert ids.shape == (2, 6)
        h, w, top, left, th, tw = ids[0].tolist()
        assert (h, w, left, th, tw) == (80, 72, 0, SIDE, SIDE) and 0 <= top <= 71 - SIDE
        assert ids[1].tolist() == [SIDE, SIDE, 0, 0, SIDE, SIDE]


# ---------------------------------------------------------------- weights in diffusers' SDXL loaders


def test_lora_loads_with_the_sdxl_pipeline_and_gives_the_vfx_samples(xl):
    from vfx.diffusion.lora import apply_lora

    root, _ = xl
    folder = run_dir(root, "lora") / "weights"
    assert {k.split(".")[0] for k in trained_tensors(root, "lora")} == {"unet", "text_encoder", "text_encoder_2"}
    pipe = base_pipe()
    pipe.load_lora_weights(str(folder))  # diffusers' own loader
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    theirs = image_of(pipe)
    assert_same_image(theirs, sampled(root, "lora"))
    assert (theirs != image_of(base_pipe())).mean() > 0.5
    off = base_pipe()
    apply_lora(off, folder, 0.0)
    assert (image_of(off) == image_of(base_pipe())).all()


def test_full_weights_load_with_the_sdxl_pipeline_with_both_encoders_trained(xl):
    from diffusers import StableDiffusionXLPipeline

    root, _ = xl
    pipe = StableDiffusionXLPipeline.from_pretrained(str(run_dir(root, "full") / "weights"))
    pipe.set_progress_bar_config(disable=True)
    base = base_pipe()
    for component in ("unet", "text_encoder", "text_encoder_2"):
        trained, original = getattr(pipe, component), getattr(base, component)
        assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), original.parameters())), component
    assert_same_image(image_of(pipe), sampled(root, "full"))


def test_kohya_export_names_both_encoders_and_loads_in_the_sdxl_pipeline(xl, tmp_path):
    root, _ = xl
    out = tmp_path / "zwx-xl.safetensors"
    ok("export", root, "--name", "lora", "--format", "kohya", "--out", out)
    with safe_open(str(out), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    pipe = base_pipe()
    pipe.load_lora_weights(str(tmp_path), weight_name=out.name)  # diffusers' kohya conversion
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    assert_same_image(image_of(pipe), sampled(root, "lora"))


def test_checkpoint_export_loads_with_from_single_file(xl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from vfx.models import load_pipeline, model_family, resolve_model, tiny_model_dir

    root, _ = xl
    out = tmp_path / "zwx-xl-full.safetensors"
    ok("export", root, "--name", "full", "--format", "checkpoint", "--out", out)
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.",
                             "conditioner.embedders.1.model.")) for k in keys)
    assert model_family(resolve_model(str(out))) == "sdxl"
    pipe = StableDiffusionXLPipeline.from_single_file(str(out), config=str(tiny_model_dir("tiny-xl")),
                                                      local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    # `--model FILE --model-config DIR` takes the same road: the family from the file, its loader.
    ours_loaded = load_pipeline(resolve_model(str(out)), torch.device("cpu"), torch.float32, str(tiny_model_dir("tiny-xl")))
    assert isinstance(ours_loaded, StableDiffusionXLPipeline)
    assert all(torch.equal(a, b) for a, b in zip(ours_loaded.unet.parameters(), pipe.unet.parameters()))
    ours = StableDiffusionXLPipeline.from_pretrained(str(run_dir(root, "full") / "weights"))
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):  # every tensor came through the key map
        loaded, trained = getattr(pipe, component).state_dict(), getattr(ours, component).state_dict()
        assert loaded.keys() == trained.keys()
        assert all(torch.equal(loaded[k], trained[k]) for k in loaded), component
    assert_same_image(image_of(pipe), sampled(root, "full"))


# ---------------------------------------------------------------- exact resume


@pytest.mark.slow
def test_lora_resume_with_both_encoders_equals_an_uninterrupted_run(xl):
    from test_dreambooth_train import step_lines, same_steps

    root, photos = xl
    args = ["--mode", "lora", "--rank", "2", "--lora-dropout", "0.2", "--train-text-encoder", "--random-crop",
            "--flip", *with_prior(run_dir(root, "lora") / "class")]
    ok(*train_args(root, "whole", photos, *args))
    ok(*train_args(root, "split", photos, *args, "--stop-after", "2"))
    ok(*train_args(root, "split", photos, *args, "--resume", "latest"))
    assert_same_tensors(trained_tensors(root, "whole"), trained_tensors(root, "split"))
    same_steps(step_lines(root, "whole"), step_lines(root, "split"))
    info = json.loads((run_dir(root, "split") / "weights" / "dreambooth.json").read_text())
    assert info["base_model_spec"] == "tiny-xl"


@pytest.mark.slow
def test_two_processes_train_both_encoders(tmp_path):
    """SDXL reads its first encoder's penultimate layer, so that encoder's last layer gets no gradient:
    under two processes (torchrun, gloo) DDP must be told, or the second step stops with its error."""
    import subprocess
    import sys

    from conftest import cli_env

    root = make_project(tmp_path / "proj", model="tiny-xl")
    args = train_args(root, "ddp", make_photos(tmp_path / "photos", 2), "--mode", "lora", "--train-text-encoder",
                      "--eval-pairs", "0", steps=3)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "vfx", *map(str, args)], env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {k.split(".")[0] for k in trained_tensors(root, "ddp")} == {"unet", "text_encoder", "text_encoder_2"}
