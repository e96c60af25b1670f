"""`vfx edit`: TokenFlow editing of the inverted video into edits/<name>/latents.zarr.

The loop keeps the current latents in two Zarr buffers (read one, write the other, per chunk), so
memory holds one chunk plus the keyframe cache, whatever the video length. Each finished step is a
unit of the stage contract: its marker records the keyframes it drew, so an interrupted edit
resumes at the first unfinished step and gives the same bytes as an uninterrupted one.

Variants: `--method sdedit` (start part-way down the schedule, no injection), `--control canny`
(a ControlNet on edge maps, written to edits/<name>/control.zarr), `--correspondence flow`
(correspondences from flow/), `--lora` (personalized weights on the model).
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
from vfx.diffusion.controlnet import CONTROLS, ControlGuide, canny, check_matches, check_thresholds
from vfx.diffusion.correspondence import CORRESPONDENCES, FlowCorrespondences, FlowFields
from vfx.diffusion.ddim import Schedule
from vfx.diffusion.sdedit import METHODS, fresh_noise, start_index
from vfx.diffusion.text import encode_prompt
from vfx.diffusion.tokenflow import PROPAGATION_MODES, Embeddings, StepIO, TokenFlowEditor, draw_keyframes
from vfx.distributed import Group
from vfx.dreambooth.weights import apply_lora, lora_file, lora_identity
from vfx.errors import BadInput, VfxError
from vfx.models import load_controlnet, resolve_controlnet
from vfx.project import slugify, validate_name
from vfx.stage import StageRun, upstream
from vfx.stages.common import Settings
from vfx.stages.flow import flow_upstream
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


def only_with(given: bool, flag: str, needs: str) -> None:
    """Refuse an option that would be silently ignored."""
    if given:
        raise BadInput(f"{flag} applies only with {needs}")


def resolve_method(method: str, start: float | None, fresh: bool, pnp_attn_t: float | None,
                   pnp_f_t: float | None) -> dict:
    """The method's own parameters, defaults filled in; options of the other method are refused."""
    if method not in METHODS:
        raise BadInput(f"unknown --method {method!r}: use {' or '.join(METHODS)}")
    if method == "pnp":
        only_with(start is not None, "--start", "--method sdedit")
        only_with(fresh, "--fresh-noise", "--method sdedit")
        resolved = {"pnp_attn_t": 0.5 if pnp_attn_t is None else pnp_attn_t, "pnp_f_t": 0.8 if pnp_f_t is None else pnp_f_t}
        for label, value in (("--pnp-attn-t", resolved["pnp_attn_t"]), ("--pnp-f-t", resolved["pnp_f_t"])):
            if not 0 <= value <= 1:
                raise BadInput(f"{label} {value} must lie in [0, 1] (a fraction of the steps)")
        return {**resolved, "start": None, "fresh_noise": False}
    only_with(pnp_attn_t is not None, "--pnp-attn-t", "--method pnp (SDEdit injects nothing)")
    only_with(pnp_f_t is not None, "--pnp-f-t", "--method pnp (SDEdit injects nothing)")
    return {"pnp_attn_t": 0.0, "pnp_f_t": 0.0, "start": 0.9 if start is None else start, "fresh_noise": fresh}


def prepare_control(settings: Settings, unet, control: str | None, model: str | None, scale: float | None,
                    low: int | None, high: int | None) -> tuple[ControlGuide | None, dict | None]:
    """The ControlNet guide and its recorded parameters (None, None without --control)."""
    if control is None:
        for flag, value in (("--control-model", model), ("--control-scale", scale), ("--canny-low", low),
                            ("--canny-high", high)):
            only_with(value is not None, flag, "--control canny")
        return None, None
    if control not in CONTROLS:
        raise BadInput(f"unknown --control {control!r}: use {' or '.join(CONTROLS)}")
    low, high = (100 if low is None else low), (200 if high is None else high)
    check_thresholds(low, high)
    scale = 1.0 if scale is None else scale
    ref = resolve_controlnet(settings.model, model)
    controlnet = load_controlnet(ref, settings.device, unet.dtype)
    check_matches(controlnet, unet, ref.location)
    return ControlGuide(controlnet, scale), {"kind": control, "model": ref.identity, "scale": scale, "low": low, "high": high}


def write_edges(frames, path: Path, low: int, high: int) -> None:
    """Canny edge maps of every frame, uint8 [N, H, W] (255 = edge), chunked like frames/."""
    count, height, width, _ = frames.shape
    chunk = frames.chunks[0]
    edges = create_array(path, (count, height, width), (chunk, height, width), "uint8",
                         {"kind": "edges", "method": "opencv-canny", "low": low, "high": high, "meaning": "255 = edge"})
    for start, end in chunk_ranges(count, chunk):
        edges[start:end] = np.stack([canny(frame, low, high) for frame in np.asarray(frames[start:end])])


def prepare_flow(settings: Settings, frames: int, size: tuple[int, int]) -> tuple[FlowCorrespondences, str]:
    """Correspondences from flow/ and its fingerprint, or an error naming `vfx flow`."""
    if frames < 2:
        raise BadInput("--correspondence flow needs at least 2 frames")
    record = flow_upstream(settings.project)
    names = ("forward", "backward", "occlusion_forward", "occlusion_backward")
    arrays = [open_array(settings.folder("flow", f"{name}.zarr")) for name in names]
    _, height, width, _ = open_array(settings.folder("frames", "frames.zarr")).shape
    if arrays[0].shape != (frames - 1, 2, height, width):
        raise BadInput(f"flow/ holds {arrays[0].shape[0] + 1} frames of {arrays[0].shape[3]}x{arrays[0].shape[2]}, the "
                       f"inversion {frames} of {width}x{height}; rerun `vfx flow {settings.project.root} --force`")
    return FlowCorrespondences(FlowFields.from_arrays(*arrays), size), record["fingerprint"]


def prepare_lora(pipe, lora: Path | None, scale: float | None) -> tuple[dict | None, str | None]:
    """Load LoRA weights into the pipeline at `scale`; their recorded identity and the file used."""
    if lora is None:
        only_with(scale is not None, "--lora-scale", "--lora PATH")
        return None, None
    file = lora_file(lora)
    scale = 1.0 if scale is None else scale
    apply_lora(pipe, file, scale)
    return {"identity": lora_identity(file), "scale": scale}, str(file.resolve())


def first_latents(trajectory, saved: list[int], schedule: Schedule, first: int, reference: bool, clean,
                  noise: np.ndarray | None, start: int, end: int) -> np.ndarray:
    """The latents of frames [start, end) at the first timestep: inverted, or clean + fresh noise."""
    if noise is None:
        return start_latents(trajectory, saved, schedule, first, reference, clean, start, end)
    x0 = np.asarray(clean[start:end], dtype=np.float32)
    return schedule.add_noise(x0, noise[None], first).astype(np.float32)


def edit(
    settings: Settings,
    prompt: str,
    name: str | None = None,
    negative_prompt: str = NEGATIVE_PROMPT,
    guidance: float = 7.5,
    steps: int = 50,
    batch_size: int = 8,
    pnp_attn_t: float | None = None,
    pnp_f_t: float | None = None,
    seed: int | None = None,
    propagation: str = "distance",
    keyframes_file: Path | None = None,
    keyframe_batch: int = 0,
    frame_batch: int = 8,
    *,
    method: str = "pnp",
    start: float | None = None,
    fresh: bool = False,
    control: str | None = None,
    control_model: str | None = None,
    control_scale: float | None = None,
    canny_low: int | None = None,
    canny_high: int | None = None,
    correspondence: str = "features",
    lora: Path | None = None,
    lora_scale: float | None = None,
) -> dict:
    """Edit the inverted video. Options left None take their documented defaults (see `vfx edit --help`)."""
    if not prompt or not prompt.strip():
        raise BadInput("the edit prompt is empty; describe the edited video with --prompt")
    name = validate_name(name or slugify(prompt), "edit name")
    if name in RESERVED_NAMES:
        raise BadInput(f"the edit name {name!r} is reserved; choose another with --name")
    if propagation not in PROPAGATION_MODES:
        raise BadInput(f"unknown --propagation {propagation!r}: use {' or '.join(PROPAGATION_MODES)}")
    if batch_size < 1 or frame_batch < 1 or keyframe_batch < 0:
        raise BadInput("--batch-size and --frame-batch must be at least 1, --keyframe-batch at least 0")
    if correspondence not in CORRESPONDENCES:
        raise BadInput(f"unknown --correspondence {correspondence!r}: use {' or '.join(CORRESPONDENCES)}")
    variant = resolve_method(method, start, fresh, pnp_attn_t, pnp_f_t)
    seed = int(settings.project.get("seed", seed))
    inversion = upstream(settings.project, "inversion", "invert", "vfx invert {dir}")
    trajectory = open_array(settings.folder("inversion", "trajectory.zarr"))
    saved = [int(t) for t in trajectory.attrs["timesteps"]]
    _, frames, channels, h, w = trajectory.shape
    chunk = trajectory.chunks[1]
    inputs = {"inversion": inversion["fingerprint"]}
    correspondences = None
    if correspondence == "flow":
        correspondences, inputs["flow"] = prepare_flow(settings, frames, (h, w))
    pipe = settings.pipeline()
    schedule = Schedule.from_pipeline(pipe)
    timesteps = schedule.timesteps(steps)
    if method == "sdedit":
        timesteps = timesteps[start_index(timesteps, variant["start"], schedule.num_train_timesteps):]
    units = len(timesteps)
    if any(t not in saved for t in timesteps):
        raise BadInput(
            f"--steps {steps}: the inversion saved the latents of a {trajectory.attrs.get('save_steps')}-step schedule; "
            f"edit with that many steps, or rerun `vfx invert {settings.project.root} --save-steps {steps}`"
        )
    given = load_keyframes(keyframes_file, units, frames) if keyframes_file else None
    if given and propagation == "reference":
        check_reference_schedule(given, frames, batch_size)
    frames_array = None
    guide, control_params = prepare_control(settings, pipe.unet, control, control_model, control_scale, canny_low,
                                            canny_high)
    if guide is not None:
        upstream(settings.project, "frames", "extract", "vfx extract {dir} --video FILE")
        frames_array = open_array(settings.folder("frames", "frames.zarr"))
        if frames_array.shape[1:3] != (8 * h, 8 * w):
            raise BadInput(f"frames/ are {frames_array.shape[2]}x{frames_array.shape[1]}, the latents {8 * w}x{8 * h}; "
                           f"rerun `vfx encode {settings.project.root}` and `vfx invert`")
    lora_params, lora_path = prepare_lora(pipe, lora, lora_scale)
    params = {
        "method": method, "model": settings.model.identity, "dtype": settings.dtype_name, "prompt": prompt,
        "negative_prompt": negative_prompt, "source_prompt": inversion["params"]["prompt"], "guidance": guidance,
        "steps": steps, "batch_size": batch_size, "pnp_attn_t": variant["pnp_attn_t"], "pnp_f_t": variant["pnp_f_t"],
        "seed": seed, "propagation": propagation, "correspondence": correspondence, "keyframes": given,
        "sdedit": {"start": variant["start"], "start_timestep": timesteps[0], "fresh_noise": variant["fresh_noise"]}
        if method == "sdedit" else None,
        "control": control_params, "lora": lora_params,
    }
    folder = settings.folder("edits", name)
    run = StageRun(folder, "edit", params, inputs, units, force=settings.force)
    result = {"stage": "edit", "name": name, "folder": str(folder)}
    if run.up_to_date() and not settings.force:
        log.info(f"edit {name}: up to date ({folder}); pass --force to recompute")
        return {**result, "state": "complete", "up_to_date": True}
    log.info(f"edit: writing edits/{name}")
    buffers = [folder / "work-0.zarr", folder / "work-1.zarr"]
    reference = propagation == "reference"

    noise = fresh_noise(seed, (channels, h, w)) if variant["fresh_noise"] else None
    if reference or noise is not None:
        upstream(settings.project, "latents", "encode", "vfx encode {dir}")
    control_path = folder / "control.zarr"

    def create() -> None:
        shutil.rmtree(folder / "latents.zarr", ignore_errors=True)
        shutil.rmtree(control_path, ignore_errors=True)
        for path in buffers:
            create_array(path, (frames, channels, h, w), (chunk, channels, h, w), "float32")
        first = open_array(buffers[0], mode="r+")
        clean = open_array(settings.folder("latents", "latents.zarr")) if reference or noise is not None else None
        for start, end in chunk_ranges(frames, chunk):
            first[start:end] = first_latents(trajectory, saved, schedule, timesteps[0], reference, clean, noise, start, end)
        if guide is not None:
            write_edges(frames_array, control_path, control_params["low"], control_params["high"])

    group = Group.from_env(settings.device)
    if not group.is_main:
        log.set_quiet(True)  # one progress bar and one set of messages, from rank 0
    if group.is_main:
        run.start(create)
    group.barrier()
    pending = sorted(set(range(units)) - run.folder.done_units())
    if pending and pending != list(range(pending[0], units)):
        raise VfxError(f"edits/{name} has out-of-order finished steps; rerun with --force to start over")

    state = TokenFlowState(query_slice=keyframe_batch)
    embeddings = Embeddings(
        encode_prompt(pipe, params["source_prompt"]), encode_prompt(pipe, negative_prompt), encode_prompt(pipe, prompt)
    )
    editor = TokenFlowEditor(pipe.unet, schedule, state, embeddings, guidance, propagation, batch_size,
                             settings.device, frame_batch, guide, correspondences)
    edges = open_array(control_path) if guide is not None else None
    installed = install(pipe.unet, state)
    began = time.perf_counter()
    ranges = chunk_ranges(frames, chunk)
    mine = group.chunks(len(ranges))
    owned = range(ranges[mine[0]][0], ranges[mine[-1]][1]) if len(mine) else range(0)

    def keyframe_latents(buffer, keyframes: list[int]) -> np.ndarray:
        """The keyframes' current latents, each read by the rank that owns its frame."""
        local = [k for k in keyframes if k in owned]
        partial = torch.zeros((len(keyframes), channels, h, w), dtype=torch.float32)
        if local:
            rows = [keyframes.index(k) for k in local]
            partial[rows] = torch.from_numpy(np.asarray(buffer.oindex[np.asarray(local)]))
        return group.combine(partial).numpy()

    try:
        with log.progress(f"edit {name}", len(pending) if group.is_main else 0, "steps") as bar:
            for step in pending:
                step_began = time.perf_counter()
                timestep = timesteps[step]
                prev = timesteps[step + 1] if step + 1 < units else None
                keyframes = given[step] if given else draw_keyframes(frames, batch_size, seed, step)
                state.inject_attention = step < int(units * variant["pnp_attn_t"])
                state.inject_conv = step < int(units * variant["pnp_f_t"])
                source_index = saved.index(timestep)
                read, write = (open_array(buffers[(step + i) % 2], mode="r+") for i in (0, 1))
                io = StepIO(
                    read=lambda s, e: read[s:e],
                    read_frames=lambda idx: keyframe_latents(read, idx),
                    read_source=lambda s, e: trajectory[source_index, s:e],
                    read_source_frames=lambda idx: trajectory.oindex[source_index, np.asarray(idx)],
                    write=lambda s, e, a: write.__setitem__(slice(s, e), a),
                    read_control=(lambda idx: edges.oindex[np.asarray(idx)]) if edges is not None else None,
                )
                editor.step(io, frames, chunk, keyframes, timestep, prev, bar.phase, mine)
                group.barrier()  # every rank's chunks of this step are written
                if group.is_main:
                    run.mark_done(step, None, round(time.perf_counter() - step_began, 3), keyframes=keyframes)
                bar.advance()
    finally:
        uninstall(pipe.unet, installed)

    def finalize() -> dict:
        final = open_array(buffers[units % 2])
        out = create_array(folder / "latents.zarr", (frames, channels, h, w), (chunk, channels, h, w), "float32",
                           {"kind": "latents", "edit": name, "prompt": prompt, "fps": trajectory.attrs.get("fps")})
        for start, end in chunk_ranges(frames, chunk):
            out[start:end] = final[start:end]
        summary = {"frames": frames, "keyframes": [run.marker(s)["keyframes"] for s in range(units)],
                   "timesteps": timesteps}
        if guide is not None:
            summary["control"] = "control.zarr"
        if lora_path:
            summary["lora_file"] = lora_path
        return summary

    if group.is_main:
        if run.finish(finalize):  # the buffers go only once the record says complete
            for path in buffers:
                shutil.rmtree(path, ignore_errors=True)
        log.info(f"edit {name}: done; decode it with `vfx decode {settings.project.root} --edit {name}`")
    group.barrier()
    return {
        **result, "state": "complete", "up_to_date": False, "computed_steps": len(pending),
        "unet_frame_evaluations": editor.unet_frames, "seconds": round(time.perf_counter() - began, 3),
        "controlnet_frame_evaluations": guide.frames if guide is not None else 0, "timesteps": timesteps,
        "injections": {"attention": state.attention_injections, "conv": state.conv_injections},
        "rank": group.rank, "world_size": group.world,
    }
