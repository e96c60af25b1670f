"""Edit variants: SDEdit, ControlNet guidance, flow correspondences, LoRA weights in editing."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import zarr

from conftest import EDIT_STEPS as STEPS
from conftest import assert_bad, edit_step, edited, inverted, invoke, make_lora, textured, tiny_pipe
from conftest import run_edit as edit_json
from vfx import opticalflow as F
from vfx.diffusion.controlnet import ControlGuide
from vfx.diffusion.correspondence import FlowCorrespondences, FlowFields, compose, to_tokens, token_grids
from vfx.diffusion.ddim import Schedule
from vfx.diffusion.sdedit import fresh_noise, start_index
from vfx.diffusion.text import Conditioning
from vfx.errors import BadInput

FIRST_LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """6 frames of a texture panning 4 px per frame, inverted with 3 steps; edits share it by name."""
    frames = [np.roll(textured(64, seed=11), 4 * k, axis=1) for k in range(6)]
    return inverted(tmp_path_factory.mktemp("variants"), frames)


def run_edit(root: Path, name: str, *extra) -> dict:
    return edit_json(root, "--name", name, *extra)


def record(root: Path, name: str) -> dict:
    return json.loads((root / "edits" / name / "stage.json").read_text())


def bad(*args) -> str:
    """Run a command that must be refused: exit 2 with one line of explanation (and nothing on stdout)."""
    result = invoke(*args)
    line = assert_bad(result)
    assert not result.stdout.strip(), result.output
    return line


# ---------------------------------------------------------------- SDEdit


def test_sdedit_starts_at_the_nearest_timestep():
    schedule = Schedule.from_pipeline(tiny_pipe())
    grid = schedule.timesteps(50)  # 981, 961, ..., 1
    assert start_index(grid, 0.9, 1000) == 4 and grid[4] == 901
    # The reference slices timesteps[int(1 - start * steps):]: two steps lower, at 861.
    assert grid[int(1 - 0.9 * 50) :][0] == 861
    assert start_index(grid, 1.0, 1000) == 0 and start_index(grid, 0.0, 1000) == 49
    assert start_index(grid, 0.001, 1000) == 49
    assert grid[start_index(grid, 0.5, 1000)] == 501
    assert start_index([30, 10], 0.02, 1000) == 0  # a tie goes to the noisier timestep
    coarse = schedule.timesteps(STEPS)  # 667, 334, 1
    assert [coarse[start_index(coarse, s, 1000)] for s in (0.9, 0.5, 0.6, 0.2)] == [667, 334, 667, 334]
    with pytest.raises(BadInput):
        start_index(grid, 1.2, 1000)


def test_fresh_noise_at_start_one_is_noise():
    from vfx.stages.edit import first_latents

    schedule = Schedule.from_pipeline(tiny_pipe())
    first = schedule.timesteps(50)[0]
    clean = np.random.default_rng(0).standard_normal((5, 4, 8, 8)).astype(np.float32)
    noise = fresh_noise(3, (4, 8, 8))
    assert np.array_equal(noise, fresh_noise(3, (4, 8, 8))) and not np.array_equal(noise, fresh_noise(4, (4, 8, 8)))
    start = first_latents(None, [], schedule, first, False, clean, noise, 0, 5)
    for frame in start:  # nearly pure noise, the same map in every frame
        assert np.corrcoef(frame.ravel(), noise.ravel())[0, 1] > 0.99
    parts = np.concatenate([first_latents(None, [], schedule, first, False, clean, noise, s, e) for s, e in ((0, 2), (2, 5))])
    assert np.array_equal(parts, start)  # independent of chunking


def test_sdedit_near_zero_returns_the_source(project):
    source = np.asarray(zarr.open_array(str(project / "latents" / "latents.zarr")))
    result = run_edit(project, "sd0", "--method", "sdedit", "--start", "0.001")
    assert result["timesteps"] == [1] and result["computed_steps"] == 1
    assert result["injections"] == {"attention": 0, "conv": 0}
    near = np.abs(edited(project, "sd0") - source)
    pnp = run_edit(project, "pnp")
    full = np.abs(edited(project, "pnp") - source)
    assert near.mean() < full.mean() / 50, "one step from t=1 stays at the source; a full edit moves far"
    unguided = run_edit(project, "sd0-g1", "--method", "sdedit", "--start", "0.001", "--guidance", "1")
    assert unguided["timesteps"] == [1]
    assert np.abs(edited(project, "sd0-g1") - source).mean() < 0.05 * source.std()
    assert pnp["timesteps"] == [667, 334, 1]
    params = record(project, "sd0")["params"]
    assert params["method"] == "sdedit" and params["sdedit"] == {"start": 0.001, "start_timestep": 1, "fresh_noise": False}
    assert params["pnp_attn_t"] == params["pnp_f_t"] == 0.0


def test_sdedit_at_one_is_pnp_without_injection(project):
    """From the noisiest inverted latents, SDEdit is exactly TokenFlow without PnP injection."""
    sdedit = run_edit(project, "sd1", "--method", "sdedit", "--start", "1.0")
    assert sdedit["timesteps"] == [667, 334, 1]
    run_edit(project, "noinj", "--pnp-attn-t", "0", "--pnp-f-t", "0")
    assert edited(project, "sd1").tobytes() == edited(project, "noinj").tobytes()
    run_edit(project, "fresh-a", "--method", "sdedit", "--start", "1.0", "--fresh-noise")
    run_edit(project, "fresh-b", "--method", "sdedit", "--start", "1.0", "--fresh-noise")
    run_edit(project, "fresh-c", "--method", "sdedit", "--start", "1.0", "--fresh-noise", "--seed", "5")
    assert edited(project, "fresh-a").tobytes() == edited(project, "fresh-b").tobytes()
    assert edited(project, "fresh-a").tobytes() not in {edited(project, "fresh-c").tobytes(), edited(project, "sd1").tobytes()}
    assert record(project, "fresh-a")["params"]["sdedit"]["fresh_noise"] is True


def test_method_options_are_checked(project):
    bad("edit", project, "--prompt", "x", "--steps", STEPS, "--start", "0.5")
    bad("edit", project, "--prompt", "x", "--steps", STEPS, "--fresh-noise")
    bad("edit", project, "--prompt", "x", "--steps", STEPS, "--method", "sdedit", "--pnp-f-t", "0.5")
    bad("edit", project, "--prompt", "x", "--steps", STEPS, "--method", "sdedit", "--start", "1.5")
    bad("edit", project, "--prompt", "x", "--steps", STEPS, "--method", "ddim")
    bad("edit", project, "--prompt", "x", "--steps", STEPS, "--control-scale", "2")
    bad("edit", project, "--prompt", "x", "--steps", STEPS, "--lora-scale", "2")
    assert not (project / "edits" / "x").exists()


# ---------------------------------------------------------------- ControlNet


def test_controlnet_residuals_reach_the_edit_branches_only():
    from vfx.models import ControlNetRef, controlnet_dir, load_controlnet, resolve_model

    pipe = tiny_pipe()
    controlnet = load_controlnet(ControlNetRef(str(controlnet_dir(resolve_model("tiny"))), "tiny"), torch.device("cpu"),
                                 torch.float32)
    sample = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(6, 77, 32, generator=torch.Generator().manual_seed(1))
    edges = np.stack([cv2.Canny(textured(64, seed=s), 100, 200) for s in (1, 2)])
    full = ControlGuide(controlnet, 1.0).residuals(sample, 500, Conditioning(context), edges)
    half = ControlGuide(controlnet, 0.5).residuals(sample, 500, Conditioning(context), edges)
    residuals = full["down_block_additional_residuals"] + [full["mid_block_additional_residual"]]
    assert len(residuals) == 3 * 4 + 1  # conv_in + 2 resnets and a downsampler per block (none after the last) + mid
    for residual in residuals:
        assert residual.shape[0] == 6
        assert torch.count_nonzero(residual[:2]) == 0, "the source branch gets no control"
        assert residual[2:].abs().amax(dim=(1, 2, 3)).min() > 0, "every edit-branch frame gets some"
    # The scale multiplies each residual once; halving is exact in binary, so at most one rounding:
    # 1 eps of the residual's scale (measured: exact).
    for a, b in zip(half["down_block_additional_residuals"], full["down_block_additional_residuals"]):
        assert float((a - 0.5 * b).abs().max()) <= torch.finfo(b.dtype).eps * 0.5 * float(b.abs().max())
    out = pipe.unet(sample, 500, encoder_hidden_states=context, **full).sample
    plain = pipe.unet(sample, 500, encoder_hidden_states=context).sample
    assert torch.equal(out[:2], plain[:2])
    for frame in range(2, 6):  # every edit-branch frame moves far beyond rounding (measured: 33-43% of its scale)
        assert float((out[frame] - plain[frame]).abs().max()) > 1e-3 * float(plain[frame].abs().max())


def test_canny_control_edit(project, tmp_path):
    result = run_edit(project, "canny", "--control", "canny")
    assert result["controlnet_frame_evaluations"] == 2 * 6 * STEPS  # edit branches of every frame, every step
    edges = np.asarray(zarr.open_array(str(project / "edits" / "canny" / "control.zarr")))
    frames = np.asarray(zarr.open_array(str(project / "frames" / "frames.zarr")))
    assert edges.dtype == np.uint8 and edges.shape == frames.shape[:3] and set(np.unique(edges)) == {0, 255}
    assert np.array_equal(edges[2], cv2.Canny(cv2.cvtColor(frames[2], cv2.COLOR_RGB2GRAY), 100, 200))
    params = record(project, "canny")["params"]["control"]
    assert params["kind"] == "canny" and params["scale"] == 1.0 and (params["low"], params["high"]) == (100, 200)
    run_edit(project, "canny0", "--control", "canny", "--control-scale", "0")
    base = run_edit(project, "plain")
    assert base["controlnet_frame_evaluations"] == 0
    assert edited(project, "canny0").tobytes() == edited(project, "plain").tobytes()
    assert edited(project, "canny").tobytes() != edited(project, "plain").tobytes()
    run_edit(project, "canny-lo", "--control", "canny", "--canny-low", "20", "--canny-high", "60")
    assert np.count_nonzero(zarr.open_array(str(project / "edits" / "canny-lo" / "control.zarr"))[:]) > np.count_nonzero(edges)
    sdedit = run_edit(project, "canny-sd", "--control", "canny", "--method", "sdedit", "--start", "0.5")
    assert sdedit["controlnet_frame_evaluations"] == 2 * 6 * 2
    preview = tmp_path / "edges.png"
    assert invoke("inspect", project / "edits" / "canny" / "control.zarr", "--preview", preview).exit_code == 0
    assert preview.stat().st_size > 0


def test_bad_controlnets(project, tmp_path):
    from diffusers import ControlNetModel

    from vfx.models import tiny_model_dir

    other = ControlNetModel(block_out_channels=(16, 32, 32, 32), layers_per_block=2, cross_attention_dim=32,
                            attention_head_dim=4, norm_num_groups=8, conditioning_embedding_out_channels=(8, 16, 32, 32))
    other.save_pretrained(tmp_path / "other")
    message = bad("edit", project, "--prompt", "x", "--steps", STEPS, "--name", "cn",
                  "--control", "canny", "--control-model", tmp_path / "other")
    assert "does not match" in message and "block_out_channels" in message
    message = bad("edit", project, "--prompt", "x", "--steps", STEPS, "--name", "cn",
                  "--control", "canny", "--control-model", tmp_path / "missing")
    assert "no such folder" in message
    # A real (non-tiny) model has no default ControlNet.
    message = bad("edit", project, "--prompt", "x", "--steps", STEPS, "--name", "cn", "--control", "canny",
                  "--model", tiny_model_dir())
    assert "--control-model" in message
    bad("edit", project, "--prompt", "x", "--steps", STEPS, "--name", "cn", "--control", "depth")
    assert not (project / "edits" / "cn").exists()


# ---------------------------------------------------------------- flow correspondences


def constant_flow(shift: tuple[float, float], pairs: int, size: int) -> np.ndarray:
    flow = np.zeros((pairs, 2, size, size), np.float32)
    flow[:, 0], flow[:, 1] = shift
    return flow


def test_composed_flow_and_token_maps():
    size, pairs = 64, 3
    forward, backward = constant_flow((8, 0), pairs, size), constant_flow((-8, 0), pairs, size)
    occluded = np.zeros((pairs, size, size), bool)
    occluded_backward = occluded.copy()
    occluded_backward[0, :, 40:48] = True  # frame 1 -> 0 is unreliable in frame 1's columns 40..47
    fields = FlowFields.from_arrays(forward, backward, occluded, occluded_backward)
    # Frame 2 -> 0 composes 2 -> 1 and 1 -> 0: 16 px to the left; frame 2's columns 48..55 land in frame 1's
    # unreliable band, and its columns 0..15 leave the frame.
    flow, unreliable = compose(backward[1], occluded_backward[1], backward[0], occluded_backward[0])
    # Sums of two bilinear samples of constant -8 px fields: a few roundings of 16 px (measured: exact).
    rounding = 4 * np.finfo(np.float32).eps * 16
    assert np.abs(flow[0] + 16).max() <= rounding and np.abs(flow[1]).max() <= rounding
    assert unreliable[:, 48:56].all() and unreliable[:, :16].all() and not unreliable[:, 16:48].any()
    assert not unreliable[:, 56:].any()
    maps = FlowCorrespondences(fields, (8, 8)).maps({(2, 0), (0, 0), (0, 3), (1, 0)})
    assert set(maps) == {(2, 0), (0, 0), (0, 3), (1, 0)}
    grid = maps[(2, 0)][64].view(8, 8)  # 8 px tokens: 2 tokens to the left
    assert (grid[:, :2] == -1).all() and (grid[:, 6] == -1).all()
    cols = torch.arange(8)
    assert (grid[:, 2:6] == cols[2:6] - 2 + 8 * torch.arange(8)[:, None]).all() and (grid[:, 7] == 5 + 8 * cols).all()
    assert torch.equal(maps[(0, 0)][64], torch.arange(64))
    forward_grid = maps[(0, 3)][64].view(8, 8)  # frame 0 -> 3 composes three forward flows: 3 tokens right
    assert (forward_grid[:, 5:] == -1).all() and (forward_grid[:, :5] == cols[:5] + 3 + 8 * torch.arange(8)[:, None]).all()
    assert set(maps[(2, 0)]) == {h * w for h, w in token_grids(8, 8)} == {64, 16, 4, 1}
    # A token keeps its flow when at least half its pixels are reliable.
    half = np.zeros((size, size), bool)
    half[:, :4] = True  # half of every token in column 0
    assert (to_tokens(np.zeros((2, size, size), np.float32), half, [(8, 8)])[64].view(8, 8)[:, 0] >= 0).all()
    half[:, :5] = True
    assert (to_tokens(np.zeros((2, size, size), np.float32), half, [(8, 8)])[64].view(8, 8)[:, 0] == -1).all()


def translated_frames() -> np.ndarray:
    """Frame k is a texture shifted right by 8k px (one token of the finest grid per frame)."""
    base = textured(160, seed=7)
    return np.stack([base[16:144, 16 - 8 * k : 144 - 8 * k] for k in range(3)])


def propagation_trace(pipe, frames: np.ndarray, correspondences=None) -> torch.Tensor:
    """Matched keyframe-0 tokens of frames 1 and 2 in the first self-attention layer, one editing step."""
    trace = {}
    edit_step(pipe, frames, [0], trace, correspondences)
    return trace[FIRST_LAYER][0]  # [2, 256]


def test_flow_correspondences_match_features_on_a_translation():
    pipe = tiny_pipe()
    frames = translated_frames()
    pairs = [F.flow_pair(frames[t], frames[t + 1]) for t in range(2)]
    fields = FlowFields.from_arrays(*(np.stack([p[i] for p in pairs]) for i in range(4)))
    flow = FlowCorrespondences(fields, (16, 16))
    maps = flow.maps({(1, 0), (2, 0)})
    by_features = propagation_trace(pipe, frames)
    by_flow = propagation_trace(pipe, frames, flow)
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    for k, (features, flowed) in enumerate(zip(by_features, by_flow), start=1):
        given = maps[(k, 0)][256]
        shifted = (rows * 16 + cols - k).reshape(-1)  # token (r, c) of frame k is token (r, c - k) of frame 0
        interior = ((cols >= 2 + k) & (cols < 14) & (rows >= 2) & (rows < 14)).reshape(-1)
        assert (given[interior] == shifted[interior]).all(), "flow recovers the translation inside the frame"
        assert (flowed[given >= 0] == given[given >= 0]).all(), "where flow is reliable, propagation follows it"
        assert (given[(cols < k).reshape(-1)] == -1).all(), "tokens entering the frame have no flow match"
        fallback = given < 0
        assert fallback.any() and (flowed[fallback] == features[fallback]).all(), "the rest fall back to features"
        agree = (flowed[interior] == features[interior]).float().mean()
        assert agree >= 0.85, f"flow and feature correspondences agree on only {agree:.0%} of the interior"


def test_flow_correspondence_edit(project):
    message = bad("edit", project, "--prompt", "x", "--steps", STEPS, "--name", "fl", "--correspondence", "flow")
    assert f"vfx flow {project}" in message
    assert not (project / "edits" / "fl").exists()
    bad("edit", project, "--prompt", "x", "--steps", STEPS, "--correspondence", "optical")
    assert invoke("flow", project).exit_code == 0
    run_edit(project, "fl", "--correspondence", "flow", "--batch-size", "3")
    run_edit(project, "ft", "--batch-size", "3")
    rec = record(project, "fl")
    assert rec["params"]["correspondence"] == "flow" and rec["inputs"]["flow/forward.zarr"]
    out = edited(project, "fl")
    assert np.isfinite(out).all() and out.tobytes() != edited(project, "ft").tobytes()
    assert record(project, "ft")["params"]["keyframes"] is None
    assert rec["summary"]["keyframes"] == record(project, "ft")["summary"]["keyframes"]
    again = run_edit(project, "fl", "--correspondence", "flow", "--batch-size", "3")
    assert again["up_to_date"]
    ref = run_edit(project, "fl-ref", "--correspondence", "flow", "--batch-size", "3", "--propagation", "reference")
    assert ref["state"] == "complete" and np.isfinite(edited(project, "fl-ref")).all()


# ---------------------------------------------------------------- LoRA


def test_lora_scale_zero_is_the_base_model(project, tmp_path):
    lora = make_lora(tmp_path / "lora")
    run_edit(project, "base")
    run_edit(project, "lora0", "--lora", lora, "--lora-scale", "0")
    run_edit(project, "lora1", "--lora", lora.parent)  # a weights folder works too; scale 1 by default
    assert edited(project, "lora0").tobytes() == edited(project, "base").tobytes()
    assert edited(project, "lora1").tobytes() != edited(project, "base").tobytes()
    zero, one = record(project, "lora0"), record(project, "lora1")
    assert zero["params"]["lora"]["scale"] == 0 and one["params"]["lora"]["scale"] == 1.0
    assert zero["params"]["lora"]["identity"] == one["params"]["lora"]["identity"]
    assert zero["fingerprint"] != record(project, "base")["fingerprint"]
    assert one["summary"]["lora_file"] == str(lora.resolve())
    other = make_lora(tmp_path / "other", seed=1)
    run_edit(project, "lora1", "--lora", other)  # other weights under the same name: stale, recomputed
    assert record(project, "lora1")["params"]["lora"]["identity"] != one["params"]["lora"]["identity"]
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    bad("edit", project, "--prompt", "x", "--steps", STEPS, "--name", "lx", "--lora", garbage)
    bad("edit", project, "--prompt", "x", "--steps", STEPS, "--name", "lx", "--lora", tmp_path / "none")
    assert not (project / "edits" / "lx").exists()
