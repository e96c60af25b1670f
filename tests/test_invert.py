"""Inversion: DDIM's agreement with diffusers' DDIMInverseScheduler, the round trips of DDIM and of
fixed-point inversion, the reconstruction grid, shards, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from conftest import (
    chunk_files, copy_project, image_folder, invoke, run_shards, textured, tiny_pipe, vfx_command, video_project,
)


@pytest.fixture(params=["tiny", "tiny-v"])
def small(request, tmp_path):
    folder = image_folder(tmp_path / "frames", [textured(64, seed=i) for i in range(3)])
    root = video_project(tmp_path / request.param, folder, "--size", "64x64", "--chunk-frames", "2",
                         "--model", request.param, stages=("extract", "encode"))
    return root, request.param


def test_trajectory_matches_diffusers_ddim_inverse_scheduler(small):
    from diffusers import DDIMInverseScheduler

    from vfx.diffusion.text import encode_prompt

    root, model = small
    result = invoke("invert", root, "--method", "ddim", "--steps", "20", "--save-steps", "5", "--prompt", "a photo",
                    "--no-reconstruction")
    assert result.exit_code == 0, result.output
    trajectory = zarr.open_array(str(root / "inversion" / "trajectory.zarr"))
    saved = trajectory.attrs["timesteps"]
    assert saved == [951, 801, 601, 401, 201, 1]  # the 5-step editing schedule plus the final latent
    assert trajectory.attrs["prediction_type"] == ("v_prediction" if model == "tiny-v" else "epsilon")

    pipe = tiny_pipe(model)
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(20)
    embedding = encode_prompt(pipe, "a photo").hidden.expand(3, -1, -1)
    x = torch.from_numpy(np.asarray(zarr.open_array(str(root / "latents" / "latents.zarr"))))
    reference = {}
    with torch.no_grad():
        for t in inverse.timesteps:
            x = inverse.step(pipe.unet(x, t, encoder_hidden_states=embedding).sample, t, x).prev_sample
            reference[int(t)] = x.numpy()
    # The same DDIM arithmetic in another operation order: float rounding only, carried through 20 UNet
    # steps. Measured at most 6.3 float32 eps of the latents' scale (tiny and tiny-v), so k = 64; the
    # fixed rtol=atol=1e-4 it replaces allowed about 1000.
    for index, t in enumerate(saved):
        rounding = 64 * np.finfo(np.float32).eps * np.abs(reference[t]).max()
        assert np.abs(trajectory[index] - reference[t]).max() <= rounding, t


def inversion_summary(root, *args) -> dict:
    result = invoke("invert", root, *args, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads((root / "inversion" / "stage.json").read_text())
    assert len(record["summary"]["psnr"]) == 3 and (root / "inversion" / "reconstruction.mp4").is_file()
    return record["summary"]


def latent_rmse(root, steps: int) -> float:
    """DDIM's round trip over its whole grid."""
    summary = inversion_summary(root, "--method", "ddim", "--steps", steps, "--save-steps", "25",
                                "--reconstruction-grid", "full")
    assert summary["unet_frame_evaluations"] == summary["reconstruction_unet_frame_evaluations"] == 3 * steps
    return summary["latent_rmse"]


def test_round_trip_returns_the_clean_latents(small):
    """Reconstruction error is DDIM inversion's approximation error: it must shrink as steps grow.

    Measured on the tiny models (latents of unit variance), latent RMSE at 25 / 100 steps:
    SD1-shaped epsilon 1.11 / 0.63, SD2-shaped v-prediction 0.081 / 0.022. First-order convergence
    would quarter the error at 4x the steps; a random UNet is far less smooth than a trained one (the
    SD1-shaped one gets 0.56x), so the bounds are loose by design.
    """
    root, model = small
    coarse, fine = latent_rmse(root, 25), latent_rmse(root, 100)
    assert fine <= 0.65 * coarse
    assert fine < (0.05 if model == "tiny-v" else 0.8)


def test_fixed_point_inversion_beats_ddim_at_fewer_unet_calls(small):
    """Each fixed-point iteration solves the step's implicit equation more closely, so the round trip
    over the editing schedule shrinks with the iterations; at 2 iterations on 20 steps (40 UNet calls
    per frame) it is below DDIM's round trip on a 100-step grid (100 calls). Measured (these 3 frames,
    latents of unit variance), 1 / 2 iterations against DDIM-100: tiny 0.66 / 0.34 against 0.63, tiny-v
    0.0092 / 0.00092 against 0.022 (bench/bench_invert.py has the 50-step schedule against DDIM-500)."""
    root, model = small
    errors = []
    for iterations in (1, 2):
        summary = inversion_summary(root, "--method", "fixed-point", "--iterations", iterations, "--save-steps", "20")
        assert summary["unet_frame_evaluations"] == 3 * 20 * iterations
        assert summary["reconstruction_unet_frame_evaluations"] == 3 * 20  # its own grid is the editing schedule
        errors.append(summary["latent_rmse"])
    assert errors[1] < 0.65 * errors[0]
    assert errors[1] < 0.75 * latent_rmse(root, 100)


def test_the_reconstruction_runs_over_the_editing_schedule_by_default(small):
    root, _ = small
    summary = inversion_summary(root, "--method", "ddim", "--steps", "20", "--save-steps", "5")
    assert summary["unet_frame_evaluations"] == 3 * 20 and summary["reconstruction_unet_frame_evaluations"] == 3 * 5
    trajectory = zarr.open_array(str(root / "inversion" / "trajectory.zarr"))
    before = np.asarray(trajectory)
    full = inversion_summary(root, "--method", "ddim", "--steps", "20", "--save-steps", "5", "--reconstruction-grid", "full")
    assert full["reconstruction_unet_frame_evaluations"] == 3 * 20
    assert np.array_equal(np.asarray(zarr.open_array(str(root / "inversion" / "trajectory.zarr"))), before)


@pytest.mark.slow
def test_concurrent_shards_equal_one_process(encoded, tmp_path):
    args = ["--steps", "10", "--save-steps", "5"]
    assert invoke("invert", encoded, *args).exit_code == 0
    sharded = copy_project(encoded, tmp_path / "sharded", ("frames", "latents"))
    run_shards(vfx_command("invert", sharded, *args))
    for array in ("trajectory.zarr", "reconstruction_latents.zarr", "reconstruction.zarr"):
        assert chunk_files(sharded / "inversion" / array) == chunk_files(encoded / "inversion" / array), array
    record = json.loads((sharded / "inversion" / "stage.json").read_text())
    assert record["state"] == "complete" and (sharded / "inversion" / "reconstruction.mp4").is_file()


def test_plan_errors_and_long_prompts(encoded):
    result = invoke("invert", encoded, "--method", "ddim", "--steps", "10", "--save-steps", "20")
    assert result.exit_code == 2 and "exceeds --steps" in result.stderr
    result = invoke("invert", encoded, "--method", "ddim", "--steps", "30", "--save-steps", "20")
    assert result.exit_code == 2 and "not on the 30-step inversion grid" in result.stderr and "fits" in result.stderr
    assert not (encoded / "inversion").exists()
    long_prompt = " ".join(["a photo of a dog"] * 30)
    result = invoke("invert", encoded, "--steps", "2", "--save-steps", "2", "--prompt", long_prompt, "--no-reconstruction")
    assert result.exit_code == 0 and "truncated" in result.stderr
    for args, words in ((["--method", "renoise"], "unknown --method"), (["--iterations", "0"], "--iterations"),
                        (["--reconstruction-grid", "half"], "--reconstruction-grid")):
        result = invoke("invert", encoded, *args, "--force")
        assert result.exit_code == 2 and words in result.stderr, args


def test_v_and_epsilon_read_from_the_scheduler_config():
    from vfx.diffusion.ddim import Schedule

    class Pipe:  # a stand-in carrying only a scheduler config
        def __init__(self, prediction):
            from diffusers import DDIMScheduler

            self.scheduler = DDIMScheduler(prediction_type=prediction)

    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for prediction in ("epsilon", "v_prediction", "sample"):
        schedule = Schedule.from_pipeline(Pipe(prediction))
        alpha = schedule.alpha(500)
        sample = schedule.move(x0, eps, alpha)
        output = {"epsilon": eps, "v_prediction": alpha**0.5 * eps - (1 - alpha) ** 0.5 * x0, "sample": x0}[prediction]
        got_x0, got_eps = schedule.split(output, sample, alpha)
        # split undoes move: a few multiply-adds each, with coefficients up to 1/sqrt(alpha) ~ 1.9 at t=500;
        # k = 8 eps of the inputs' scale (measured: at most 1.3 over 20 seeds).
        rounding = 8 * torch.finfo(torch.float32).eps * max(float(x0.abs().max()), float(eps.abs().max()))
        assert float((got_x0 - x0).abs().max()) <= rounding and float((got_eps - eps).abs().max()) <= rounding


def test_an_empty_inversion_prompt_is_warned_about_at_init_and_invert(tmp_path):
    from conftest import image_folder, ok, textured

    frames = image_folder(tmp_path / "frames", [textured(64, i) for i in range(2)])
    warned = ok("init", tmp_path / "p", "--video", frames, "--size", "64x64").stderr
    assert "inversion prompt is empty" in warned and "correspondences" in warned
    assert "inversion prompt is empty" not in ok("init", tmp_path / "q", "--prompt", "a dog").stderr
    ok("extract", tmp_path / "p")
    ok("encode", tmp_path / "p")
    assert "inversion prompt is empty" in ok("invert", tmp_path / "p", "--steps", "2", "--save-steps", "2").stderr
    quiet = ok("invert", tmp_path / "p", "--steps", "2", "--save-steps", "2", "--prompt", "a dog").stderr
    assert "inversion prompt is empty" not in quiet
