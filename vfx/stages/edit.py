"""`vfx edit`: TokenFlow editing of the inverted video into edits/<name>/latents.zarr.

The loop keeps the current latents in two Zarr buffers (read one, write the other, whole chunks at a
time, up to tokenflow.IO_BYTES per call), so memory holds that slice plus the keyframe cache, whatever
the video length. Each finished step is a unit of the stage contract: its marker records the keyframes
it drew and a checksum of the buffer it wrote, so an interrupted edit resumes at the first unfinished
step and gives the same bytes as an uninterrupted one. Only the latest step's buffer is kept (the one
before is overwritten two steps later), so only the latest marker names its parts; once complete, that
marker names latents.zarr.

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
from vfx.diffusion.controlnet import ControlGuide, canny, check_matches
from vfx.diffusion.correspondence import FlowCorrespondences, FlowFields
from vfx.diffusion.ddim import Schedule
from vfx.diffusion.lora import apply_lora, lora_file, lora_identity
from vfx.diffusion.sdedit import fresh_noise, start_index
from vfx.diffusion.text import encode_prompt
from vfx.diffusion.tokenflow import Embeddings, StepIO, TokenFlowEditor, draw_keyframes
from vfx.distributed import Group
from vfx.driver import Stage, checked_checksum, drive
from vfx.graph import FLOW_ARRAYS
from vfx.errors import BadInput, VfxError
from vfx.models import load_controlnet, resolve_controlnet
from vfx.settings import Settings
from vfx.stage import DONE_DIR, Part, StageRun, parts_checksum, upstream
from vfx.stages.depth import depth_input
from vfx.stages.edit_config import EditConfig
from vfx.stages.encode import pixel_size
from vfx.store import chunk_ranges, create_array, open_array

FINAL = "latents.zarr"
BUFFERS = ("work-0.zarr", "work-1.zarr")


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


def write_edges(frames, path: Path, low: int, high: int) -> None:
    """Canny edge maps of every frame, uint8 [N, H, W] (255 = edge), chunked like frames/."""
    count, height, width, _ = frames.shape
    chunk = frames.chunks[0]
    edges = create_array(path, (count, height, width), (chunk, height, width), "uint8",
                         {"kind": "edges", "method": "opencv-canny", "low": low, "high": high, "meaning": "255 = edge"})
    for start, end in chunk_ranges(count, chunk):
        edges[start:end] = np.stack([canny(frame, low, high) for frame in np.asarray(frames[start:end])])


def first_latents(trajectory, saved: list[int], schedule: Schedule, first: int, reference: bool, clean,
                  noise: np.ndarray | None, start: int, end: int) -> np.ndarray:
    """The latents of frames [start, end) at the first timestep: inverted, or clean + fresh noise."""
    if noise is None:
        return start_latents(trajectory, saved, schedule, first, reference, clean, start, end)
    x0 = np.asarray(clean[start:end], dtype=np.float32)
    return schedule.add_noise(x0, noise[None], first).astype(np.float32)


class Edit(Stage):
    unit_name = "steps"

    def __init__(self, settings: Settings, cfg: EditConfig):
        self.settings = settings
        self.cfg = cfg = cfg.resolved(settings.project.get("seed"))
        self.label = f"edit {cfg.name}"
        project = settings.project
        inversion = upstream(project, "invert", "trajectory.zarr")
        self.source_prompt = inversion.record["params"]["prompt"]
        self.trajectory = open_array(inversion.folder / "trajectory.zarr")
        self.saved = [int(t) for t in self.trajectory.attrs["timesteps"]]
        _, self.frames, self.channels, self.h, self.w = self.trajectory.shape
        self.chunk = self.trajectory.chunks[1]
        inputs = inversion.input()
        depth_inputs, self.depth = depth_input(settings, self.frames, self.h, self.w)
        inputs.update(depth_inputs)
        self.schedule = settings.schedule()
        self.timesteps = self.editing_timesteps()
        units = len(self.timesteps)
        self.given = load_keyframes(cfg.keyframes, units, self.frames) if cfg.keyframes else None
        if self.given and cfg.propagation == "reference":
            check_reference_schedule(self.given, self.frames, cfg.batch_size)
        if cfg.correspondence == "flow":
            inputs.update(self.flow_inputs())
        self.control = self.control_params()
        if self.control is not None:
            inputs.update(upstream(project, "extract", "frames.zarr").input())
        self.reference = cfg.propagation == "reference"
        if self.reference or cfg.fresh_noise:
            inputs.update(upstream(project, "encode", "latents.zarr").input())
        self.lora = {"identity": lora_identity(cfg.lora), "scale": cfg.lora_scale} if cfg.lora else None
        self.folder = settings.folder("edits", cfg.name)
        self.run = StageRun(self.folder, "edit", self.params(), inputs, units, force=settings.force)
        self.group = Group()

    def editing_timesteps(self) -> list[int]:
        """The edit's schedule (SDEdit: from its start), every timestep of which the inversion saved."""
        cfg = self.cfg
        timesteps = self.schedule.timesteps(cfg.steps)
        if cfg.method == "sdedit":
            timesteps = timesteps[start_index(timesteps, cfg.start, self.schedule.num_train_timesteps):]
        if any(t not in self.saved for t in timesteps):
            raise BadInput(
                f"--steps {cfg.steps}: the inversion saved the latents of a "
                f"{self.trajectory.attrs.get('save_steps')}-step schedule; edit with that many steps, or rerun "
                f"`vfx invert {self.settings.project.root} --save-steps {cfg.steps}`")
        return timesteps

    def flow_inputs(self) -> dict:
        """flow/'s arrays as inputs, checked to match the inversion's frames."""
        if self.frames < 2:
            raise BadInput("--correspondence flow needs at least 2 frames")
        project, inputs = self.settings.project, {}
        for name in FLOW_ARRAYS:
            inputs.update(upstream(project, "flow", f"{name}.zarr").input())
        forward = open_array(project.path("flow", "forward.zarr"))
        _, height, width, _ = open_array(project.path("frames", "frames.zarr")).shape
        if forward.shape != (self.frames - 1, 2, height, width):
            raise BadInput(f"flow/ holds {forward.shape[0] + 1} frames of {forward.shape[3]}x{forward.shape[2]}, the "
                           f"inversion {self.frames} of {width}x{height}; rerun `vfx flow {project.root} --force`")
        return inputs

    def control_params(self) -> dict | None:
        cfg = self.cfg
        if cfg.control is None:
            return None
        self.control_ref = resolve_controlnet(self.settings.model, cfg.control_model)
        return {"kind": cfg.control, "model": self.control_ref.identity, "scale": cfg.control_scale,
                "low": cfg.canny_low, "high": cfg.canny_high}

    def params(self) -> dict:
        cfg = self.cfg
        return {
            "method": cfg.method, "model": self.settings.model.identity, "dtype": self.settings.dtype_name,
            "prompt": cfg.prompt, "negative_prompt": cfg.negative_prompt, "source_prompt": self.source_prompt,
            "guidance": cfg.guidance, "steps": cfg.steps, "batch_size": cfg.batch_size, "pnp_attn_t": cfg.pnp_attn_t,
            "pnp_f_t": cfg.pnp_f_t, "seed": cfg.seed, "propagation": cfg.propagation,
            "correspondence": cfg.correspondence, "keyframes": self.given,
            "sdedit": {"start": cfg.start, "start_timestep": self.timesteps[0], "fresh_noise": cfg.fresh_noise}
            if cfg.method == "sdedit" else None,
            "control": self.control, "lora": self.lora,
        }

    # ---------------------------------------------------------------- before the first write

    def prepare(self) -> None:
        """Load the model, ControlNet and LoRA, and build the editor: all that can fail, before any write."""
        cfg, settings = self.cfg, self.settings
        self.began = time.perf_counter()
        pipe = settings.pipeline()
        guide = None
        if self.control is not None:
            controlnet = load_controlnet(self.control_ref, settings.device, pipe.unet.dtype)
            check_matches(controlnet, pipe.unet, self.control_ref.location)
            guide = ControlGuide(controlnet, cfg.control_scale)
            frames = open_array(settings.folder("frames", "frames.zarr"))
            if frames.shape[1:3] != (8 * self.h, 8 * self.w):
                raise BadInput(f"frames/ are {frames.shape[2]}x{frames.shape[1]}, the latents {8 * self.w}x{8 * self.h}; "
                               f"rerun `vfx encode {settings.project.root}` and `vfx invert`")
        if cfg.lora is not None:
            apply_lora(pipe, lora_file(cfg.lora), cfg.lora_scale)
        correspondences = None
        if cfg.correspondence == "flow":
            arrays = [open_array(settings.folder("flow", f"{name}.zarr")) for name in FLOW_ARRAYS]
            correspondences = FlowCorrespondences(FlowFields.from_arrays(*arrays), (self.h, self.w))
        size = pixel_size((self.h, self.w))
        embeddings = Embeddings(encode_prompt(pipe, self.source_prompt, size),
                                encode_prompt(pipe, cfg.negative_prompt, size, negative=True),
                                encode_prompt(pipe, cfg.prompt, size))
        self.editor = TokenFlowEditor(pipe.unet, self.schedule, embeddings, cfg.guidance, cfg.propagation,
                                      cfg.batch_size, settings.device, cfg.frame_batch, guide, correspondences,
                                      query_slice=cfg.keyframe_batch)
        self.noise = fresh_noise(cfg.seed, (self.channels, self.h, self.w)) if cfg.fresh_noise else None
        self.group = Group.from_env(settings.device)
        ranges = chunk_ranges(self.frames, self.chunk)
        self.mine = self.group.chunks(len(ranges))
        self.owned = range(ranges[self.mine[0]][0], ranges[self.mine[-1]][1]) if len(self.mine) else range(0)

    def create(self) -> None:
        """Fresh buffers holding the start latents, and the edge maps when a ControlNet guides the edit."""
        folder, shape = self.folder, (self.frames, self.channels, self.h, self.w)
        shutil.rmtree(folder / FINAL, ignore_errors=True)
        shutil.rmtree(folder / "control.zarr", ignore_errors=True)
        for name in BUFFERS:
            create_array(folder / name, shape, (self.chunk, *shape[1:]), "float32")
        first = open_array(folder / BUFFERS[0], mode="r+")
        clean = open_array(self.settings.folder("latents", "latents.zarr")) if self.reference or self.noise is not None \
            else None
        for start, end in chunk_ranges(self.frames, self.chunk):
            first[start:end] = first_latents(self.trajectory, self.saved, self.schedule, self.timesteps[0],
                                             self.reference, clean, self.noise, start, end)
        if self.control is not None:
            write_edges(open_array(self.settings.folder("frames", "frames.zarr")), folder / "control.zarr",
                        self.control["low"], self.control["high"])

    def pending(self) -> list[int]:
        """The steps still to run, in order (rank 0 prepares the buffers; every rank reads the markers)."""
        units = self.run.units
        if self.group.is_main:
            self.run.start(self.create)
            done = self.run.folder.done_units()
            first = min(set(range(units)) - done, default=units)
            if first < units and not (self.folder / BUFFERS[first % 2]).exists():
                self.start_over()  # a damaged final result: its buffers are gone, so every step runs again
        self.group.barrier()
        pending = sorted(set(range(units)) - self.run.folder.done_units())
        if pending and pending != list(range(pending[0], units)):
            raise VfxError(f"edits/{self.cfg.name} has out-of-order finished steps; rerun with --force to start over")
        log.info(f"edit: writing edits/{self.cfg.name}")
        self.computed_steps = len(pending)
        return pending

    def start_over(self) -> None:
        shutil.rmtree(self.folder / DONE_DIR, ignore_errors=True)
        self.create()

    # ---------------------------------------------------------------- the step loop

    def session(self):
        return self.editor.hooked()

    def do_unit(self, step: int, bar: log.Bar) -> None:
        cfg, timesteps, units = self.cfg, self.timesteps, self.run.units
        timestep = timesteps[step]
        prev = timesteps[step + 1] if step + 1 < units else None
        keyframes = self.given[step] if self.given else draw_keyframes(self.frames, cfg.batch_size, cfg.seed, step)
        self.keyframes = keyframes
        self.editor.step(self.step_io(step), self.frames, self.chunk, keyframes, timestep, prev, bar.phase, self.mine,
                         inject_attention=step < int(units * cfg.pnp_attn_t),
                         inject_conv=step < int(units * cfg.pnp_f_t))
        self.group.barrier()  # every rank's chunks of this step are written

    def step_io(self, step: int) -> StepIO:
        read, write = (open_array(self.folder / BUFFERS[(step + i) % 2], mode="r+") for i in (0, 1))
        source_index = self.saved.index(self.timesteps[step])
        trajectory = self.trajectory
        edges = open_array(self.folder / "control.zarr") if self.control is not None else None
        depth = self.depth
        return StepIO(
            read=lambda s, e: read[s:e],
            read_frames=lambda idx: self.keyframe_latents(read, idx),
            read_source=lambda s, e: trajectory[source_index, s:e],
            read_source_frames=lambda idx: trajectory.oindex[source_index, np.asarray(idx)],
            write=lambda s, e, a: write.__setitem__(slice(s, e), a),
            read_control=(lambda idx: edges.oindex[np.asarray(idx)]) if edges is not None else None,
            read_depth=(lambda idx: depth.oindex[np.asarray(idx)]) if depth is not None else None,
        )

    def keyframe_latents(self, buffer, keyframes: list[int]) -> np.ndarray:
        """The keyframes' current latents, each read by the rank that owns its frame."""
        local = [k for k in keyframes if k in self.owned]
        partial = torch.zeros((len(keyframes), self.channels, self.h, self.w), dtype=torch.float32)
        if local:
            rows = [keyframes.index(k) for k in local]
            partial[rows] = torch.from_numpy(np.asarray(buffer.oindex[np.asarray(local)]))
        return self.group.combine(partial).numpy()

    def parts(self, step: int) -> list[Part]:
        return [Part(BUFFERS[(step + 1) % 2], 0, self.frames)]

    def mark(self, step: int, parts: list[Part], seconds: float) -> None:
        """Rank 0 marks the step with its keyframes and the checksum of the buffer it wrote; the step before
        loses its parts, since its buffer is the next one to be overwritten."""
        if not self.group.is_main:
            return
        run = self.run
        run.mark_done(step, checked_checksum(self, step, parts), seconds, parts=parts, keyframes=self.keyframes)
        before = run.marker(step - 1) if step > 0 else None
        if before and before.get("parts"):
            run.mark_done(step - 1, None, before.get("seconds"), keyframes=before["keyframes"])

    # ---------------------------------------------------------------- the end

    def finish(self) -> bool:
        complete = True
        if self.group.is_main:
            complete = self.run.finish(self.finalize)
            if complete:  # the buffers go only once the record says complete
                for name in BUFFERS:
                    shutil.rmtree(self.folder / name, ignore_errors=True)
            log.info(f"edit {self.cfg.name}: done; decode it with "
                     f"`vfx decode {self.settings.project.root} --edit {self.cfg.name}`")
        self.group.barrier()
        return complete

    def finalize(self) -> dict:
        """latents.zarr from the last buffer; the last marker then names it (the same bytes)."""
        run, units, shape = self.run, self.run.units, (self.frames, self.channels, self.h, self.w)
        final = open_array(self.folder / BUFFERS[units % 2])
        out = create_array(self.folder / FINAL, shape, (self.chunk, *shape[1:]), "float32",
                           {"kind": "latents", "edit": self.cfg.name, "prompt": self.cfg.prompt,
                            "fps": self.trajectory.attrs.get("fps")})
        for start, end in chunk_ranges(self.frames, self.chunk):
            out[start:end] = final[start:end]
        last = run.marker(units - 1)
        parts = [Part(FINAL, 0, self.frames)]
        run.mark_done(units - 1, parts_checksum(run.path, parts), last.get("seconds"), parts=parts,
                      keyframes=last["keyframes"])
        summary = {"frames": self.frames, "keyframes": [run.marker(s)["keyframes"] for s in range(units)],
                   "timesteps": self.timesteps}
        if self.control is not None:
            summary["control"] = "control.zarr"
        if self.cfg.lora:
            summary["lora_file"] = str(lora_file(self.cfg.lora).resolve())
        return summary

    def report(self, summary: dict) -> dict:
        result = {"name": self.cfg.name, "timesteps": self.timesteps, "rank": self.group.rank,
                  "world_size": self.group.world}
        editor = getattr(self, "editor", None)
        if editor is not None:
            guide = editor.control
            result.update(unet_frame_evaluations=editor.unet_frames, injections=editor.injections,
                          controlnet_frame_evaluations=guide.frames if guide is not None else 0,
                          computed_steps=self.computed_steps, seconds=round(time.perf_counter() - self.began, 3))
        return result


def edit(settings: Settings, cfg: EditConfig) -> dict:
    """Edit the inverted video with the options of `cfg` (see `vfx edit --help`)."""
    return drive(Edit(settings, cfg))
