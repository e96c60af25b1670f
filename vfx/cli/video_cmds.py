"""The video stages: extract, encode, depth, invert, edit, decode."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vfx import log
from vfx.cli import app
from vfx.cli.common import (
    AllowPickleOpt, DeviceOpt, DtypeOpt, ForceOpt, JsonOpt, ModelConfigOpt, ModelOpt, ProjectDir, ShardOpt, command, emit,
    report, settings_for,
)
from vfx.errors import BadInput
from vfx.stages.edit_config import DEFAULTS as EDIT_DEFAULTS, NEGATIVE_PROMPT, EditConfig

BatchOpt = Annotated[int, typer.Option("--batch-size", help="Frames per VAE call.")]


@command(app, "extract")
def extract_cmd(
    root: ProjectDir,
    video: Annotated[Path | None, typer.Argument(help="Video file (any container PyAV opens) or image folder; the same as --video. Default: vfx.toml's video.", show_default=False)] = None,
    video_option: Annotated[Path | None, typer.Option("--video", help="The video, as an option (VIDEO or --video, not both).", show_default=False)] = None,
    size: Annotated[str | None, typer.Option(help="Output WxH (multiples of 8, reached by --fit), or auto: the source's aspect ratio, short side the model's native size or the source's if smaller. Default: vfx.toml (auto).", show_default=False)] = None,
    fit: Annotated[str | None, typer.Option(help="How --size WxH is reached: cover (scale and crop the centre), contain (scale to fit inside, keeping the aspect ratio) or stretch. Default: vfx.toml (cover).", show_default=False)] = None,
    short_side: Annotated[int | None, typer.Option(help="Instead of --size: scale the short side to this, crop each side to a multiple of 8.", show_default=False)] = None,
    start: Annotated[str | None, typer.Option(help="First frame: an index (30) or seconds (1.5s).", show_default=False)] = None,
    end: Annotated[str | None, typer.Option(help="Stop before this frame index or time (2.5s).", show_default=False)] = None,
    stride: Annotated[int, typer.Option(help="Keep every Nth frame.")] = 1,
    fps: Annotated[float | None, typer.Option(help="Resample to this frame rate (instead of --stride).", show_default=False)] = None,
    max_frames: Annotated[int | None, typer.Option(help="Keep at most N frames (0: all). Default: vfx.toml.", show_default=False)] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Decode a video or image folder into frames/ (uint8 RGB, Zarr), recording fps and size, and keep its audio (frames/audio.m4a)."""
    from vfx.media import Selection, parse_position, parse_size
    from vfx.project import Project
    from vfx.stages.extract import extract

    if video is not None and video_option is not None and video.resolve() != video_option.resolve():
        raise BadInput(f"two videos given ({video} as VIDEO, {video_option} as --video); pass one")
    project = Project.open(root)
    source = video or video_option or (Path(project.config["video"]) if project.config.get("video") else None)
    if source is None:
        raise BadInput("no video given: pass VIDEO (vfx extract DIR VIDEO) or --video VIDEO, or set video in vfx.toml")
    if size is not None and short_side is not None:
        raise BadInput("--size and --short-side cannot be combined; pick one")
    parsed_size = None if short_side is not None else parse_size(project.get("size", size))
    fit = project.get("fit", fit)
    selection = Selection(parse_position(start), parse_position(end), stride, fps, int(project.get("max_frames", max_frames)))
    result = extract(project, source, parsed_size, short_side, fit, selection, int(project.config["chunk_frames"]), force)
    emit(result, as_json, None if result.get("up_to_date") else f"extract: {result['frames']} frames {result['width']}x{result['height']} @ {result['fps_float']:.3g} fps" + (" with audio" if result.get("audio") else ""))
    if result.get("up_to_date") and not as_json:
        emit(result, False, "extract: up to date")


@command(app, "encode")
def encode_cmd(
    root: ProjectDir,
    batch_size: BatchOpt = 4,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    allow_pickle: AllowPickleOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    shard: ShardOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Encode frames/ into latents/: the VAE posterior mean x scaling factor, [N, 4, H/8, W/8]."""
    from vfx.stages.encode import encode

    settings = settings_for(root, model, device, dtype, shard, force, allow_pickle, model_config)
    report(encode(settings, batch_size), as_json)


@command(app, "depth")
def depth_cmd(
    root: ProjectDir,
    depth_model: Annotated[str | None, typer.Option("--depth-model", help="A DPT depth model (transformers DPTForDepthEstimation folder with its preprocessor_config.json, or a cached Hub id such as Intel/dpt-hybrid-midas). Default: the model's own depth_estimator/.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Frames per depth-estimator call.")] = 4,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    allow_pickle: AllowPickleOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    shard: ShardOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Estimate each frame's depth into depth/ ([N, 1, H/8, W/8] in [-1, 1]), for a depth-conditioned model (stable-diffusion-2-depth), which invert and edit then read."""
    from vfx.stages.depth import compute_depth

    settings = settings_for(root, model, device, dtype, shard, force, allow_pickle, model_config)
    report(compute_depth(settings, depth_model, batch_size), as_json)


@command(app, "decode")
def decode_cmd(
    root: ProjectDir,
    edit: Annotated[str | None, typer.Option(help="Decode edits/NAME; without it, the source latents.", show_default=False)] = None,
    png: Annotated[bool, typer.Option("--png", help="Also write every frame as a PNG.")] = False,
    batch_size: BatchOpt = 4,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    allow_pickle: AllowPickleOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    shard: ShardOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Decode latents (the source's, or an edit's) into decoded/NAME/: frames (Zarr) and an H.264 video at the source fps, with the audio extract kept."""
    from vfx.stages.decode import decode

    settings = settings_for(root, model, device, dtype, shard, force, allow_pickle, model_config)
    result = decode(settings, edit, batch_size, png)
    report(result, as_json)
    if result.get("video") and result.get("state") == "complete" and not as_json:
        emit(result, False, f"video: {result['video']}")


@command(app, "invert")
def invert_cmd(
    root: ProjectDir,
    steps: Annotated[int | None, typer.Option(help="--method ddim: inversion steps (default 500, as the reference). fixed-point inverts on the editing schedule (--save-steps) instead.", show_default=False)] = None,
    save_steps: Annotated[int | None, typer.Option(help="Steps of the editing schedule whose timesteps are saved (edit --steps must match). Default: vfx.toml's steps (50).", show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option(help="Inversion prompt describing the source; also the edit's source branch. Default: vfx.toml's prompt (empty). Over 77 tokens: truncated with a warning.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Frames per UNet call.")] = 8,
    reconstruction: Annotated[bool, typer.Option("--reconstruction/--no-reconstruction", help="Denoise back, decode, write reconstruction.mp4 and per-frame PSNR.")] = True,
    reconstruction_grid: Annotated[str, typer.Option(help="editing: reconstruct over the editing schedule from its noisiest saved latent, as the edit denoises. full: over the whole inversion grid (as many steps again as the inversion).")] = "editing",
    method: Annotated[str, typer.Option(help="fixed-point: invert on the editing schedule, each step refined by --iterations fixed-point iterations (100 UNet calls per frame at the defaults, a smaller round-trip error than DDIM's 500). ddim: plain DDIM up the --steps grid, as the reference. See docs/editing.md.")] = "fixed-point",
    iterations: Annotated[int, typer.Option(help="fixed-point: iterations per step, one UNet call each.")] = 2,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    allow_pickle: AllowPickleOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    shard: ShardOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """DDIM-invert latents/ into inversion/: the latents along the trajectory at the editing schedule's timesteps."""
    from vfx.stages.invert import invert

    settings = settings_for(root, model, device, dtype, shard, force, allow_pickle, model_config)
    if steps is not None and method == "fixed-point":
        log.note("invert: --steps applies to --method ddim; fixed-point inverts on the editing schedule (--save-steps)")
    result = invert(settings, 500 if steps is None else steps, settings.project.get("steps", save_steps), prompt, batch_size,
                    reconstruction, method, iterations, reconstruction_grid)
    report(result, as_json)
    if result.get("psnr_mean") is not None and not as_json:
        emit(result, False, f"reconstruction PSNR: {result['psnr_mean']:.2f} dB")


@command(app, "edit")
def edit_cmd(
    root: ProjectDir,
    prompt: Annotated[str, typer.Option(help="The edited video's description (required; an empty prompt is refused).", show_default=False)],
    name: Annotated[str | None, typer.Option(help="Edit name (folder edits/NAME). Default: derived from the prompt.", show_default=False)] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="Negative prompt (the unconditional branch).", show_default=NEGATIVE_PROMPT)] = None,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = EditConfig.guidance,
    steps: Annotated[int | None, typer.Option(help="Denoising steps; the inversion must have saved this schedule (invert --save-steps). Default: vfx.toml's steps (50).", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Window length: one random keyframe is drawn per window of this many frames, every step.")] = EditConfig.batch_size,
    method: Annotated[str, typer.Option(help="pnp: TokenFlow + plug-and-play injection from the inverted noise. sdedit: start part-way down the schedule (--start), no injection; see docs/edit-variants.md.")] = EditConfig.method,
    pnp_attn_t: Annotated[float | None, typer.Option(help="pnp: fraction of the steps with query/key injection in the decoder's self-attention.", show_default=str(EDIT_DEFAULTS["pnp_attn_t"]))] = None,
    pnp_f_t: Annotated[float | None, typer.Option(help="pnp: fraction of the steps with resnet-feature injection.", show_default=str(EDIT_DEFAULTS["pnp_f_t"]))] = None,
    start: Annotated[float | None, typer.Option(help="sdedit: noise level to start from, a fraction of the schedule's range; the edit starts at the schedule's timestep nearest it (1.0: the noisiest).", show_default=str(EDIT_DEFAULTS["start"]))] = None,
    fresh_noise: Annotated[bool, typer.Option("--fresh-noise", help="sdedit: start from the clean latents plus new seeded Gaussian noise (one map for every frame) instead of the inverted latents.")] = False,
    control: Annotated[str | None, typer.Option(help="canny: condition the edit branches on Canny edges of the source frames through a ControlNet (edge maps kept in edits/NAME/control.zarr).", show_default=False)] = None,
    control_model: Annotated[str | None, typer.Option(help="ControlNet: a diffusers folder or cached Hub id matching the model's UNet. Default: the tiny model's own (other models need this).", show_default=False)] = None,
    control_scale: Annotated[float | None, typer.Option(help="Scale of the ControlNet residuals (0: no effect).", show_default=str(EDIT_DEFAULTS["control_scale"]))] = None,
    canny_low: Annotated[int | None, typer.Option(help="Canny lower hysteresis threshold.", show_default=str(EDIT_DEFAULTS["canny_low"]))] = None,
    canny_high: Annotated[int | None, typer.Option(help="Canny upper hysteresis threshold.", show_default=str(EDIT_DEFAULTS["canny_high"]))] = None,
    correspondence: Annotated[str, typer.Option(help="features: match tokens to keyframes by source-feature similarity. flow: compose flow/ (run `vfx flow` first) from each frame to its keyframes; occluded tokens fall back to features.")] = EditConfig.correspondence,
    lora: Annotated[Path | None, typer.Option(help="LoRA weights applied to the model: a .safetensors file in any layout diffusers loads (diffusers, peft, kohya/A1111), or a `vfx train --mode lora` weights folder.", show_default=False)] = None,
    lora_scale: Annotated[float | None, typer.Option(help="Strength of the LoRA (0: exactly the base model).", show_default=str(EDIT_DEFAULTS["lora_scale"]))] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the keyframe draws. Default: vfx.toml (0).", show_default=False)] = None,
    propagation: Annotated[str, typer.Option(help="distance: blend the two neighbouring keyframes by real distance. reference: the reference implementation's window-centre sigmoid blend of the previous keyframe, for comparison.")] = EditConfig.propagation,
    keyframes: Annotated[Path | None, typer.Option(help="Replay a keyframe schedule (JSON list of lists or .npy, steps x K) instead of drawing one.", show_default=False)] = None,
    keyframe_batch: Annotated[int, typer.Option(help="Keyframes per extended-attention query slice, bounding attention memory (0: all at once).")] = EditConfig.keyframe_batch,
    frame_batch: Annotated[int, typer.Option(help="Frames per UNet call in the propagation pass (3 rows each; the keyframes' call takes the first of them when the keyframes are fewer); lower it if memory runs short.")] = EditConfig.frame_batch,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    allow_pickle: AllowPickleOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Edit the video with TokenFlow: keyframes with extended attention, features propagated to every frame (PnP or SDEdit, optional ControlNet, flow correspondences, LoRA)."""
    from vfx.stages.edit import edit

    options = dict(prompt=prompt, name=name, guidance=guidance, steps=steps, batch_size=batch_size, method=method,
                   pnp_attn_t=pnp_attn_t, pnp_f_t=pnp_f_t, start=start, fresh_noise=fresh_noise, control=control,
                   control_model=control_model, control_scale=control_scale, canny_low=canny_low,
                   canny_high=canny_high, correspondence=correspondence, lora=lora, lora_scale=lora_scale, seed=seed,
                   propagation=propagation, keyframes=keyframes, keyframe_batch=keyframe_batch,
                   frame_batch=frame_batch)
    if negative_prompt is not None:
        options["negative_prompt"] = negative_prompt
    settings = settings_for(root, model, device, dtype, None, force, allow_pickle, model_config, shardable=False)
    options["steps"] = settings.project.get("steps", steps)
    result = edit(settings, EditConfig(**options))
    text = f"edit {result['name']}: " + ("up to date" if result.get("up_to_date") else "complete")
    emit(result, as_json, text)
