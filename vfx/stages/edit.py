"""`vfx edit`: TokenFlow editing of the inverted video into edits/<name>/latents.zarr.

The loop keeps the current latents in two Zarr buffers (read one, write the other, per chunk), so
memory holds one chunk plus the keyframe cache, whatever the video length. Each finished step is a
unit of the stage contract: its marker records the keyframes it drew, so an interrupted edit
resumes at the first unfinished step and gives the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from vfx import log
from vfx.diffusion.attention import TokenFlowState, install, uninstall
from vfx.diffusion.ddim import Schedule
from vfx.diffusion.text import encode_prompt
from vfx.diffusion.tokenflow import PROPAGATION_MODES, Embeddings, StepIO, TokenFlowEditor, draw_keyframes
from vfx.errors import BadInput, VfxError
from vfx.project import slugify, validate_name
from vfx.stage import StageRun
from vfx.stages.common import Settings, upstream
from vfx.store import chunk_ranges, create_array, open_array

NEGATIVE_PROMPT = "ugly, blurry, low res, unrealistic, unaesthetic"
RESERVED_NAMES = {"source", "inversion"}  # used by decode/ and eval/ for the source and the reconstruction


def load_keyframes(path: Path, steps: int, frames: int) -> list[list[int]]:
    """A steps x K keyframe schedule from JSON or .npy (never unpickled), validated."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"--keyframes {path}: no such file")
    try:
        data = np.load(path, allow_pickle=False) if path.suffix == ".npy" else np.asarray(json.loads(path.read_text()))
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"--keyframes {path} is not a JSON list of lists or an .npy array: {exc}") from None
    if data.ndim != 2 or data.shape[0] != steps or not np.issubdtype(data.dtype, np.integer):
        raise BadInput(f"--keyframes {path} must be an integer array of shape ({steps}, K); got {data.shape} {data.dtype}")
    if data.min() < 0 or data.max() >= frames or np.any(np.diff(data, axis=1) <= 0):
        raise BadInput(f"--keyframes {path}: each row must be increasing frame indices in [0, {frames})")
    return data.tolist()


def check_reference_schedule(schedule: list[list[int]], frames: int, window: int) -> None:
    windows = chunk_ranges(frames, window)
    for row in schedule:
        if len(row) != len(windows) or any(not start <= k < end for k, (start, end) in zip(row, windows)):
            raise BadInput(f"--propagation reference needs one keyframe inside each window of {window} frames")


def start_latents(trajectory, saved: list[int], schedule: Schedule, first: int, reference: bool, clean, start: int, end: int):
    """The latents the edit starts from: the inverted latents at the first editing timestep, or (the
    reference's way) the noise implied by the final latent, re-applied to the clean latents."""
    if not reference:
        return np.asarray(trajectory[saved.index(first), start:end])
    x0 = np.asarray(clean[start:end], dtype=np.float64)
    noisiest = np.asarray(trajectory[0, start:end], dtype=np.float64)
    a_final = schedule.alpha(saved[0])
    eps = (noisiest - a_final**0.5 * x0) / (1 - a_final) ** 0.5
    a_first = schedule.alpha(first)
    return (a_first**0.5 * x0 + (1 - a_first) ** 0.5 * eps).astype(np.float32)


def edit(
    settings: Settings,
    prompt: str,
    name: str | None = None,
    negative_prompt: str = NEGATIVE_PROMPT,
    guidance: float = 7.5,
    steps: int = 50,
    batch_size: int = 8,
    pnp_attn_t: float = 0.5,
    pnp_f_t: float = 0.8,
    seed: int | None = None,
    propagation: str = "distance",
    keyframes_file: Path | None = None,
    keyframe_batch: int = 0,
    frame_batch: int = 8,
) -> dict:
    if not prompt or not prompt.strip():
        raise BadInput("the edit prompt is empty; describe the edited video with --prompt")
    name = validate_name(name or slugify(prompt), "edit name")
    if name in RESERVED_NAMES:
        raise BadInput(f"the edit name {name!r} is reserved; choose another with --name")
    if propagation not in PROPAGATION_MODES:
        raise BadInput(f"unknown --propagation {propagation!r}: use {' or '.join(PROPAGATION_MODES)}")
    if batch_size < 1 or frame_batch < 1 or keyframe_batch < 0:
        raise BadInput("--batch-size and --frame-batch must be at least 1, --keyframe-batch at least 0")
    for label, value in (("--pnp-attn-t", pnp_attn_t), ("--pnp-f-t", pnp_f_t)):
        if not 0 <= value <= 1:
            raise BadInput(f"{label} {value} must lie in [0, 1] (a fraction of the steps)")
    seed = int(settings.project.get("seed", seed))
    inversion = upstream(settings, "inversion", "invert", "vfx invert {dir}")
    trajectory = open_array(settings.folder("inversion", "trajectory.zarr"))
    saved = [int(t) for t in trajectory.attrs["timesteps"]]
    _, frames, channels, h, w = trajectory.shape
    chunk = trajectory.chunks[1]
    pipe = settings.pipeline()
    schedule = Schedule.from_pipeline(pipe)
    timesteps = schedule.timesteps(steps)
    if any(t not in saved for t in timesteps):
        raise BadInput(
            f"--steps {steps}: the inversion saved the latents of a {trajectory.attrs.get('save_steps')}-step schedule; "
            f"edit with that many steps, or rerun `vfx invert {settings.project.root} --save-steps {steps}`"
        )
    given = load_keyframes(keyframes_file, steps, frames) if keyframes_file else None
    if given and propagation == "reference":
        check_reference_schedule(given, frames, batch_size)
    params = {
        "method": "pnp", "model": settings.model.identity, "dtype": settings.dtype_name, "prompt": prompt,
        "negative_prompt": negative_prompt, "source_prompt": inversion["params"]["prompt"], "guidance": guidance,
        "steps": steps, "batch_size": batch_size, "pnp_attn_t": pnp_attn_t, "pnp_f_t": pnp_f_t, "seed": seed,
        "propagation": propagation, "correspondence": "features", "keyframes": given,
    }
    folder = settings.folder("edits", name)
    run = StageRun(folder, "edit", params, {"inversion": inversion["fingerprint"]}, steps, force=settings.force)
    result = {"stage": "edit", "name": name, "folder": str(folder)}
    if run.up_to_date() and not settings.force:
        log.info(f"edit {name}: up to date ({folder}); pass --force to recompute")
        return {**result, "state": "complete", "up_to_date": True}
    log.info(f"edit: writing edits/{name}")
    buffers = [folder / "work-0.zarr", folder / "work-1.zarr"]
    reference = propagation == "reference"

    def create() -> None:
        shutil.rmtree(folder / "latents.zarr", ignore_errors=True)
        for path in buffers:
            create_array(path, (frames, channels, h, w), (chunk, channels, h, w), "float32")
        first = open_array(buffers[0], mode="r+")
        clean = open_array(settings.folder("latents", "latents.zarr")) if reference else None
        for start, end in chunk_ranges(frames, chunk):
            first[start:end] = start_latents(trajectory, saved, schedule, timesteps[0], reference, clean, start, end)

    pending = run.start(create)
    if pending and pending != list(range(pending[0], steps)):
        raise VfxError(f"edits/{name} has out-of-order finished steps; rerun with --force to start over")

    state = TokenFlowState(query_slice=keyframe_batch)
    embeddings = Embeddings(
        encode_prompt(pipe, params["source_prompt"]), encode_prompt(pipe, negative_prompt), encode_prompt(pipe, prompt)
    )
    editor = TokenFlowEditor(pipe.unet, schedule, state, embeddings, guidance, propagation, batch_size,
                             settings.device, frame_batch)
    installed = install(pipe.unet, state)
    began = time.perf_counter()
    try:
        with log.progress(f"edit {name}", len(pending), "steps") as bar:
            for step in pending:
                step_began = time.perf_counter()
                timestep = timesteps[step]
                prev = timesteps[step + 1] if step + 1 < steps else None
                keyframes = given[step] if given else draw_keyframes(frames, batch_size, seed, step)
                state.inject_attention = step < int(steps * pnp_attn_t)
                state.inject_conv = step < int(steps * pnp_f_t)
                source_index = saved.index(timestep)
                read, write = (open_array(buffers[(step + i) % 2], mode="r+") for i in (0, 1))
                io = StepIO(
                    read=lambda s, e: read[s:e],
                    read_frames=lambda idx: read.oindex[np.asarray(idx)],
                    read_source=lambda s, e: trajectory[source_index, s:e],
                    read_source_frames=lambda idx: trajectory.oindex[source_index, np.asarray(idx)],
                    write=lambda s, e, a: write.__setitem__(slice(s, e), a),
                )
                editor.step(io, frames, chunk, keyframes, timestep, prev, bar.phase)
                run.mark_done(step, None, round(time.perf_counter() - step_began, 3), keyframes=keyframes)
                bar.advance()
    finally:
        uninstall(pipe.unet, installed)

    def finalize() -> dict:
        final = open_array(buffers[steps % 2])
        out = create_array(folder / "latents.zarr", (frames, channels, h, w), (chunk, channels, h, w), "float32",
                           {"kind": "latents", "edit": name, "prompt": prompt, "fps": trajectory.attrs.get("fps")})
        for start, end in chunk_ranges(frames, chunk):
            out[start:end] = final[start:end]
        for path in buffers:
            shutil.rmtree(path, ignore_errors=True)
        return {"frames": frames, "keyframes": [run.marker(s)["keyframes"] for s in range(steps)]}

    run.finish(finalize)
    log.info(f"edit {name}: done; decode it with `vfx decode {settings.project.root} --edit {name}`")
    return {
        **result, "state": "complete", "up_to_date": False, "computed_steps": len(pending),
        "unet_frame_evaluations": editor.unet_frames, "seconds": round(time.perf_counter() - began, 3),
        "injections": {"attention": state.attention_injections, "conv": state.conv_injections},
    }
