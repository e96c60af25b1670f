"""SDXL: the embedded tiny-xl model, its conditioning against diffusers' SDXL pipeline, the PnP layers of
SDXL's decoder, and the video stages' guarantees on tiny-xl (the same ones the SD tests hold)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from conftest import EDIT_STEPS as STEPS
from conftest import (
    assert_bad, assert_every_frame_edited, assert_killed_edit_resumes, assert_static_edit, chunk_files,
    copy_project, edited, image_folder, inverted, invoke, make_lora, ok, ok_json, run_edit, run_shards,
    textured, tiny_pipe, vfx_command, video_project,
)
from vfx.diffusion.attention import find_layers
from vfx.diffusion.text import encode_prompt, is_sdxl

EPS32 = float(np.finfo(np.float32).eps)


def pan(count: int, seed: int) -> list[np.ndarray]:
    return [np.roll(textured(64, seed=seed), 4 * k, axis=1) for k in range(count)]


def xl_inverted(tmp_path, frames, name: str = "p", steps: int = STEPS):
    return inverted(tmp_path, frames, model="tiny-xl", name=name, steps=steps)


# ---------------------------------------------------------------- the model


def test_tiny_xl_is_sdxl_shaped():
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    from vfx.models import ControlNetRef, controlnet_dir, load_controlnet, resolve_model
    from vfx.tiny_models import SDXL_SCALING_FACTOR

    pipe = tiny_pipe("tiny-xl")
    assert isinstance(pipe, StableDiffusionXLPipeline) and is_sdxl(pipe)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time" and unet.down_block_types[0] == "DownBlock2D"
    assert list(unet.transformer_layers_per_block) == [1, 1, 2]  # more layers deeper in, as SDXL's 0 / 2 / 10
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.vae.config.scaling_factor == SDXL_SCALING_FACTOR and pipe.vae.config.force_upcast
    controlnet = load_controlnet(ControlNetRef(str(controlnet_dir(resolve_model("tiny-xl"))), "tiny-xl"),
                                 torch.device("cpu"), torch.float32)
    assert controlnet.config.addition_embed_type == "text_time"
    assert not tiny_pipe().unet.config.addition_embed_type  # the SD models are unchanged


def test_the_xl_vae_is_the_tiny_vae_in_rescaled_latents():
    """Same images, latents scaled by k = trained / 0.13025, so SDXL's factor still gives unit variance."""
    sd, xl = tiny_pipe().vae, tiny_pipe("tiny-xl").vae
    k = sd.config.scaling_factor / xl.config.scaling_factor
    image = torch.from_numpy(textured(64, seed=1)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        mean_sd, mean_xl = sd.encode(image).latent_dist.mean, xl.encode(image).latent_dist.mean
        # k x one float32 product: a few eps of the latents' scale (measured 0.8 eps).
        assert float((mean_xl - k * mean_sd).abs().max()) <= 16 * EPS32 * float(mean_xl.abs().max())
        decoded_sd, decoded_xl = sd.decode(mean_sd).sample, xl.decode(mean_xl).sample
    # The decoder's first convolution absorbs 1/k: rounding through the decoder, measured 3.5 eps of the
    # images' unit scale; k = 64.
    assert float((decoded_xl - decoded_sd).abs().max()) <= 64 * EPS32
    scaled = mean_xl * xl.config.scaling_factor
    assert 0.5 < float(scaled.std()) < 2.0


def test_conditioning_is_the_sdxl_pipelines():
    pipe = tiny_pipe("tiny-xl")
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a red robot", do_classifier_free_guidance=True)
        ours, uncond = encode_prompt(pipe, "a red robot", (64, 96)), encode_prompt(pipe, "", (64, 96), negative=True)
    assert torch.equal(ours.hidden, embeds) and torch.equal(ours.pooled, pooled)
    # With no negative prompt the SDXL pipeline guides against zeros (force_zeros_for_empty_prompt).
    assert torch.equal(uncond.hidden, negative) and torch.equal(uncond.pooled, negative_pooled)
    assert not negative.any()
    time_ids = pipe._get_add_time_ids((64, 96), (0, 0), (64, 96), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(ours.time_ids, time_ids)
    kwargs = ours.repeat(3).unet_kwargs()
    assert kwargs["encoder_hidden_states"].shape[0] == 3 and kwargs["added_cond_kwargs"]["time_ids"].shape == (3, 6)


def test_every_edit_call_conditions_each_branch_as_sdxl_does(tmp_path):
    """[source | uncond | cond] rows get the inversion prompt's, the negative prompt's (zeros for an empty
    one, as the SDXL pipeline) and the edit prompt's pooled embeddings, and every row the frames'
    micro-conditioning (64x96, uncropped)."""
    from vfx.settings import Settings
    from vfx.stages.edit import edit
    from vfx.stages.edit_config import NEGATIVE_PROMPT, EditConfig

    frames = [np.ascontiguousarray(np.roll(textured(96, seed=2), 4 * k, axis=1)[16:80]) for k in range(3)]
    folder = image_folder(tmp_path / "frames", frames)
    root = video_project(tmp_path / "p", folder, "--size", "96x64", "--model", "tiny-xl", "--prompt", "a woman",
                         stages=("extract", "encode", ("invert", "--steps", STEPS, "--save-steps", STEPS,
                                                       "--no-reconstruction")))
    settings = Settings.resolve(root)
    pipe = settings.pipeline()
    seen = []
    pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]),
                                        with_kwargs=True)
    source, cond = encode_prompt(pipe, "a woman").pooled, encode_prompt(pipe, "a red robot").pooled
    for negative in (NEGATIVE_PROMPT, ""):
        seen.clear()
        edit(settings, EditConfig("a red robot", f"e{len(negative)}", steps=STEPS, negative_prompt=negative))
        uncond = encode_prompt(pipe, negative, negative=True).pooled
        assert seen and uncond.any() == bool(negative)
        for added in seen:
            rows = added["text_embeds"].shape[0] // 3
            branches = added["text_embeds"].chunk(3)
            for branch, expected in zip(branches, (source, uncond, cond)):
                assert torch.equal(branch, expected.expand(rows, -1))
            assert added["time_ids"].tolist() == [[64, 96, 0, 0, 64, 96]] * (3 * rows)


# ---------------------------------------------------------------- PnP layers


def test_pnp_layers_of_the_real_sdxl_unet():
    """Walked on SDXL's own config (built on the meta device: no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    from vfx.random_models import load_configs

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(load_configs("sdxl")["unet/config.json"])
    layers = find_layers(unet)
    assert layers.injected_conv == "up_blocks.0.resnets.1.conv2"
    expected = [f"up_blocks.0.attentions.{j}.transformer_blocks.{k}.attn1.processor" for j in (1, 2) for k in range(10)]
    expected += [f"up_blocks.1.attentions.{j}.transformer_blocks.{k}.attn1.processor" for j in range(3) for k in range(2)]
    assert layers.injected_attention == expected
    assert len(layers.self_attention) == 2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2  # down, mid, up transformers


def test_pnp_layers_of_tiny_xl():
    layers = find_layers(tiny_pipe("tiny-xl").unet)
    assert layers.injected_conv == "up_blocks.0.resnets.1.conv2"
    assert layers.injected_attention == (
        [f"up_blocks.0.attentions.{j}.transformer_blocks.{k}.attn1.processor" for j in (1, 2) for k in range(2)]
        + [f"up_blocks.1.attentions.{j}.transformer_blocks.0.attn1.processor" for j in range(3)])


def test_injection_counts(tmp_path):
    root = xl_inverted(tmp_path, pan(5, 4))
    none = run_edit(root, "--name", "none", "--pnp-attn-t", "0", "--pnp-f-t", "0")
    assert none["injections"] == {"attention": 0, "conv": 0}
    full = run_edit(root, "--name", "full", "--pnp-attn-t", "1", "--pnp-f-t", "1", "--frame-batch", "3")
    layers = find_layers(tiny_pipe("tiny-xl").unet)
    assert full["injections"]["attention"] == STEPS * len(layers.injected_attention)
    # One keyframe in 5 frames: its call takes the first 2 frames to propagate (3 a call), a second the last 2.
    keyframes = json.loads((root / "edits" / "full" / "stage.json").read_text())["summary"]["keyframes"]
    assert all(len(row) == 1 for row in keyframes)
    assert full["injections"]["conv"] == 2 * STEPS
    assert edited(root, "none").tobytes() != edited(root, "full").tobytes()


# ---------------------------------------------------------------- guarantees of the video stages


def test_static_video_edits_to_identical_frames(tmp_path):
    assert_static_edit(xl_inverted(tmp_path, [textured(64, seed=3)] * 6))


@pytest.mark.parametrize("count", [1, 9])
def test_every_frame_count_produces_every_frame(tmp_path, count):
    assert_every_frame_edited(xl_inverted(tmp_path, pan(count, 1)), count)


def test_edit_variants_decode_and_eval(tmp_path):
    """SDEdit, Canny ControlNet, flow correspondences and a LoRA on tiny-xl; then decode and eval."""
    root = xl_inverted(tmp_path, pan(6, 11))
    base = run_edit(root, "--name", "base")
    sdedit = run_edit(root, "--name", "sd", "--method", "sdedit", "--start", "0.5")
    canny = run_edit(root, "--name", "canny", "--control", "canny")
    assert canny["controlnet_frame_evaluations"] == 2 * 6 * STEPS
    ok("flow", root)
    run_edit(root, "--name", "fl", "--correspondence", "flow")
    lora = make_lora(tmp_path / "lora", model="tiny-xl")
    run_edit(root, "--name", "lora0", "--lora", lora, "--lora-scale", "0")
    run_edit(root, "--name", "lora1", "--lora", lora)
    outputs = {name: edited(root, name) for name in ("base", "sd", "canny", "fl", "lora1")}
    assert all(np.isfinite(out).all() for out in outputs.values())
    assert len({out.tobytes() for out in outputs.values()}) == len(outputs), "every variant changes the edit"
    assert edited(root, "lora0").tobytes() == outputs["base"].tobytes()
    assert base["state"] == sdedit["state"] == "complete"
    ok("decode", root, "--edit", "base")
    frames = np.asarray(zarr.open_array(str(root / "decoded" / "base" / "frames.zarr")))
    assert frames.shape == (6, 64, 64, 3) and frames.dtype == np.uint8 and frames.std() > 0
    metrics = ok_json("eval", root, "--edit", "base")["metrics"]
    assert np.isfinite(metrics["warp_error"]["edit"]) and metrics["warp_error"]["source"] >= 0


def test_inversion_round_trip_converges_and_is_evaluated(tmp_path):
    """DDIM's round-trip error must shrink as its steps grow, as on the SD models (see test_invert);
    measured on tiny-xl (latents of std 0.76), latent RMSE at 25 / 100 steps: 0.89 / 0.41."""
    folder = image_folder(tmp_path / "frames", [textured(64, seed=i) for i in range(2)])
    root = video_project(tmp_path / "xl", folder, "--size", "64x64", "--model", "tiny-xl", stages=("extract", "encode"))
    errors = []
    for steps in (25, 100):
        ok("invert", root, "--method", "ddim", "--steps", steps, "--save-steps", "25", "--reconstruction-grid", "full")
        summary = json.loads((root / "inversion" / "stage.json").read_text())["summary"]
        assert summary["unet_frame_evaluations"] == 2 * steps
        errors.append(summary["latent_rmse"])
    assert errors[1] <= 0.65 * errors[0]
    trajectory = zarr.open_array(str(root / "inversion" / "trajectory.zarr"))
    assert trajectory.shape[1:] == (2, 4, 8, 8) and np.isfinite(np.asarray(trajectory)).all()
    psnr = ok_json("eval", root, "--inversion")["metrics"]["per_frame"]["psnr"]
    assert len(psnr) == 2 and min(psnr) > 10  # measured 12.9 and 13.3 dB


@pytest.mark.slow
def test_killed_edit_resumes_to_identical_bytes(tmp_path):
    assert_killed_edit_resumes(xl_inverted(tmp_path, pan(8, 9), steps=10))


@pytest.mark.slow
def test_concurrent_invert_shards_equal_one_process(tmp_path):
    folder = image_folder(tmp_path / "frames", [textured(64, seed=i) for i in range(4)])
    root = video_project(tmp_path / "one", folder, "--size", "64x64", "--chunk-frames", "1", "--model", "tiny-xl",
                         stages=("extract", "encode"))
    sharded = copy_project(root, tmp_path / "sharded", ("frames", "latents"))
    args = ["--steps", "10", "--save-steps", "5"]
    ok("invert", root, *args)
    run_shards(vfx_command("invert", sharded, *args))
    for array in ("trajectory.zarr", "reconstruction_latents.zarr", "reconstruction.zarr"):
        assert chunk_files(sharded / "inversion" / array) == chunk_files(root / "inversion" / array), array


# ---------------------------------------------------------------- model families and bad input


def test_the_family_comes_from_the_config_never_the_name(tmp_path):
    from vfx.models import load_pipeline, model_family, resolve_model, tiny_model_dir

    misleading = {"stable-diffusion-v1-5": "tiny-xl", "stable-diffusion-xl-base-1.0": "tiny"}
    for name, variant in misleading.items():
        shutil.copytree(tiny_model_dir(variant), tmp_path / name)
        ref = resolve_model(str(tmp_path / name))
        pipe = load_pipeline(ref, torch.device("cpu"), torch.float32)
        assert model_family(ref) == ("sdxl" if variant == "tiny-xl" else "sd") and is_sdxl(pipe) == (variant == "tiny-xl")


def test_a_single_file_is_told_by_its_tensor_names(tmp_path):
    """SDXL's original layout keeps its second text encoder under conditioner.embedders.1 (SD 1.x:
    cond_stage_model, SD 2.x: cond_stage_model.model); only the header is read."""
    from safetensors.torch import save_file

    from vfx.models import model_family, resolve_model

    layouts = {"sd1": "cond_stage_model.transformer.text_model.final_layer_norm.bias",
               "sd2": "cond_stage_model.model.ln_final.bias",
               "sdxl": "conditioner.embedders.1.model.ln_final.bias"}
    for name, text_key in layouts.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({"model.diffusion_model.out.2.bias": torch.zeros(4), text_key: torch.zeros(4)}, str(path))
        assert model_family(resolve_model(str(path))) == ("sdxl" if name == "sdxl" else "sd")


def test_bad_sdxl_inputs(tmp_path):
    from vfx.models import controlnet_dir, resolve_model, tiny_model_dir

    root = xl_inverted(tmp_path, pan(2, 2))
    sd_controlnet = controlnet_dir(resolve_model("tiny"))
    result = invoke("edit", root, "--prompt", "x", "--steps", STEPS, "--name", "cn", "--control", "canny",
                    "--control-model", sd_controlnet)
    assert "does not match" in assert_bad(result)
    refiner = tmp_path / "refiner"
    shutil.copytree(tiny_model_dir("tiny-xl"), refiner)
    shutil.rmtree(refiner / "text_encoder")
    index = json.loads((refiner / "model_index.json").read_text())
    index["text_encoder"] = index["tokenizer"] = [None, None]
    (refiner / "model_index.json").write_text(json.dumps(index))
    assert "refiner" in assert_bad(invoke("edit", root, "--prompt", "x", "--steps", STEPS, "--name", "r",
                                          "--model", refiner))
    assert not (root / "edits" / "cn").exists() and not (root / "edits" / "r").exists()
