"""`vfx invert`: DDIM inversion of every frame's latent, saving the trajectory the edit stage reads.

`inversion/trajectory.zarr` is [T, N, 4, h, w] float32, chunked per (1, chunk, 4, h, w); axis 0
follows `attrs.timesteps` (descending: the final, noisiest latent first, then the editing
schedule's timesteps). Inversion is independent per frame, so it shards by frame chunk.
Methods (`--method`):
- `ddim`: plain DDIM inversion up the `--steps` grid (500 by default, as the reference). Each step
  evaluates the UNet once, on the lower-noise latent, and assumes its output holds at the next level.
- `fixed-point`: inversion on the editing schedule itself, each step refined by fixed-point iterations
  (`--iterations`): the latent z at the next level is re-solved so that one DDIM denoising step from z
  lands exactly back on the current latent, using the UNet's output at z. This is the iteration of
  Pan et al., "Effective Real Image Editing with Accelerated Iterative Diffusion Inversion" (ICCV 2023)
  and of ReNoise (Garibi et al., 2024), without their averaging or noise regularisation; the first
  guess of each step reuses the noise found at the step before, so each iteration is one UNet call:
  100 per frame at the defaults (2 iterations, 50 steps) against DDIM's 500.

The reconstruction check denoises back, decodes, and scores PSNR against the source frames. By default
it runs over the editing schedule from its noisiest saved latent, as the edit does; `--reconstruction-
grid full` runs it over the whole inversion grid instead.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch

from vfx import log
from vfx.diffusion.cross_attention import one_text_per_call
from vfx.diffusion.ddim import Schedule
from vfx.diffusion.depth import with_depth
from vfx.diffusion.text import Conditioning, encode_prompt
from vfx.errors import BadInput
from vfx.project import EMPTY_PROMPT
from vfx.media import write_mp4
from vfx.metrics import psnr
from vfx.driver import Stage, drive
from vfx.settings import Settings
from vfx.stage import Part, StageRun, upstream
from vfx.stages.decode import decode_latents
from vfx.stages.depth import depth_input
from vfx.stages.encode import pixel_size
from vfx.store import chunk_ranges, create_array, open_array

FOLDER = "inversion"
METHODS = ("ddim", "fixed-point")
RECONSTRUCTION_GRIDS = ("editing", "full")


def inversion_plan(schedule: Schedule, steps: int, save_steps: int) -> tuple[list[int], list[int]]:
    """(inversion grid ascending, saved timesteps descending); explains when they don't fit."""
    if save_steps < 1:
        raise BadInput(f"invalid --save-steps {save_steps}: must be at least 1")
    if save_steps > steps:
        raise BadInput(f"--save-steps {save_steps} exceeds --steps {steps}: the saved timesteps must lie on the inversion grid")
    grid = sorted(schedule.timesteps(steps))
    editing = schedule.timesteps(save_steps)
    missing = [t for t in editing if t not in grid]
    if missing:
        fits = [n for n in range(save_steps, schedule.num_train_timesteps + 1, save_steps)
                if set(editing) <= set(schedule.timesteps(n))]
        hint = f"; --steps {min(fits, key=lambda n: abs(n - steps))} fits" if fits else ""
        raise BadInput(
            f"timestep {missing[0]} of the {save_steps}-step editing schedule is not on the {steps}-step "
            f"inversion grid{hint}"
        )
    saved = sorted(set(editing) | {grid[-1]}, reverse=True)
    return grid, saved


def unet_eval(unet, latents: torch.Tensor, timestep: int, embedding: Conditioning,
              depth: torch.Tensor | None = None) -> torch.Tensor:
    """One UNet call for a batch of latents sharing one prompt's conditioning (and, for a depth model,
    reading their depth maps)."""
    condition = embedding.repeat(latents.shape[0]).unet_kwargs()
    dtype = unet.conv_in.weight.dtype  # what its first layer reads (`unet.dtype` walks every parameter, per call)
    return unet(with_depth(latents, depth).to(dtype), timestep, **condition).sample.to(latents.dtype)


def move_up(schedule: Schedule, start: torch.Tensor, eps: torch.Tensor, current: int | None, target: int) -> torch.Tensor:
    """The latent at `target` from which one DDIM denoising step with noise `eps` lands on `start`."""
    alpha = schedule.alpha(current)
    x0 = (start - (1 - alpha) ** 0.5 * eps) / alpha**0.5
    return schedule.move(x0, eps, schedule.alpha(target))


@torch.no_grad()
def invert_latents(unet, schedule: Schedule, latents: torch.Tensor, embedding: Conditioning, grid: list[int],
                   save: set[int], bar: log.Bar | None = None, iterations: int = 0,
                   depth: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Invert up the ascending `grid`; return the latents at the `save` timesteps.

    iterations 0: plain DDIM, one UNet call per step on the lower-noise latent. iterations k: k
    fixed-point iterations per step (k UNet calls), each solving for the higher-noise latent with the
    noise the UNet sees in the previous guess; the first guess reuses the step before's noise (none at
    the first step), so no call is spent on it."""
    saved = {}
    x = latents
    current = None
    eps = torch.zeros_like(latents)
    for timestep in grid:
        if iterations:
            start = x
            for _ in range(iterations):
                x = move_up(schedule, start, eps, current, timestep)
                _, eps = schedule.split(unet_eval(unet, x, timestep, embedding, depth), x, schedule.alpha(timestep))
            x = move_up(schedule, start, eps, current, timestep)
        else:
            x = schedule.invert_step(unet_eval(unet, x, timestep, embedding, depth), x, current, timestep)
        current = timestep
        if timestep in save:
            saved[timestep] = x.clone()
        if bar is not None:
            bar.advance(len(latents) * max(1, iterations))
    return saved


@torch.no_grad()
def denoise_latents(unet, schedule: Schedule, noisy: torch.Tensor, embedding: Conditioning, grid_desc: list[int],
                    bar: log.Bar | None = None, depth: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic DDIM sampling (no guidance) down the descending grid."""
    x = noisy
    for index, timestep in enumerate(grid_desc):
        prev = grid_desc[index + 1] if index + 1 < len(grid_desc) else None
        x = schedule.denoise_step(unet_eval(unet, x, timestep, embedding, depth), x, timestep, prev)
        if bar is not None:
            bar.advance(len(noisy))
    return x


class Invert(Stage):
    label = "invert"
    unit_name = "frame-steps"

    def __init__(self, settings: Settings, steps: int, save_steps: int, prompt: str | None, batch_size: int,
                 reconstruction: bool, method: str = "fixed-point", iterations: int = 2,
                 reconstruction_grid: str = "editing"):
        if batch_size < 1:
            raise BadInput(f"invalid --batch-size {batch_size}: must be at least 1")
        if method not in METHODS:
            raise BadInput(f"unknown --method {method!r}: use {' or '.join(METHODS)}")
        if reconstruction_grid not in RECONSTRUCTION_GRIDS:
            raise BadInput(f"unknown --reconstruction-grid {reconstruction_grid!r}: use {' or '.join(RECONSTRUCTION_GRIDS)}")
        if steps < 1:  # refused whichever method: a bad value is a mistake even where it does not apply
            raise BadInput(f"invalid --steps {steps}: must be at least 1")
        if method == "fixed-point" and not 1 <= iterations <= 20:
            raise BadInput(f"invalid --iterations {iterations}: must be between 1 and 20")
        self.settings, self.batch_size, self.reconstruction = settings, batch_size, reconstruction
        self.reconstruction_grid = reconstruction_grid
        self.iterations = iterations if method == "fixed-point" else 0
        # fixed-point inverts on the editing schedule itself: --steps does not apply
        self.steps, self.save_steps = (save_steps if method == "fixed-point" else steps), save_steps
        source = upstream(settings.project, "encode", "latents.zarr")
        self.prompt = settings.project.get("prompt", prompt) or ""
        self.latents = open_array(settings.folder("latents", "latents.zarr"))
        self.chunk = self.latents.chunks[0]
        count, _, h, w = self.latents.shape
        inputs, self.depth = depth_input(settings, count, h, w)
        self.ranges = chunk_ranges(self.latents.shape[0], self.chunk)
        params = {
            "model": settings.model.identity, "dtype": settings.dtype_name, "prompt": self.prompt, "steps": steps,
            "save_steps": save_steps, "reconstruction": reconstruction, "reconstruction_grid": reconstruction_grid,
        }
        if method != "ddim":  # recorded only when not plain DDIM, so earlier trajectories stay valid
            params.update(method=method, iterations=self.iterations, steps=self.steps)
        self.run = StageRun(settings.folder(FOLDER), "invert", params, {**source.input(), **inputs}, len(self.ranges),
                            force=settings.force, shard=settings.shard)

    def prepare(self) -> None:
        self.schedule = self.settings.schedule()
        self.grid, self.saved = inversion_plan(self.schedule, self.steps, self.save_steps)
        if not self.prompt:  # once the options are known to be good: a refusal stays one line
            log.warn(EMPTY_PROMPT)
        full = self.reconstruction_grid == "full"
        self.denoising = self.grid[::-1] if full else self.schedule.timesteps(self.save_steps)
        self.evaluations = len(self.grid) * max(1, self.iterations)  # per frame
        self.steps_per_unit = self.chunk * (self.evaluations + (len(self.denoising) if self.reconstruction else 0))
        self.pipe = self.settings.pipeline()
        self.embedding = encode_prompt(self.pipe, self.prompt, pixel_size(self.latents.shape))

    def create(self) -> None:
        count, channels, h, w = self.latents.shape
        chunk = self.chunk
        attrs = {
            "kind": "inversion-trajectory", "timesteps": self.saved, "prompt": self.prompt,
            "inversion_steps": self.steps, "save_steps": self.save_steps,
            "prediction_type": self.schedule.prediction_type,
            "scheduler": self.schedule.scheduler_config.get("_class_name", "DDIMScheduler"),
        }
        path = self.run.path
        create_array(path / "trajectory.zarr", (len(self.saved), count, channels, h, w), (1, chunk, channels, h, w),
                     "float32", attrs)
        if self.reconstruction:
            create_array(path / "reconstruction_latents.zarr", (count, channels, h, w), (chunk, channels, h, w),
                         "float32", {"kind": "latents"})
            create_array(path / "reconstruction.zarr", (count, h * 8, w * 8, 3), (chunk, h * 8, w * 8, 3), "uint8",
                         {"kind": "frames"})

    def session(self):
        return one_text_per_call(self.pipe.unet)  # every call inverts or denoises frames of one prompt

    def do_unit(self, unit: int, bar: log.Bar) -> None:
        start, end = self.ranges[unit]
        unet, path = self.pipe.unet, self.run.path
        trajectory = open_array(path / "trajectory.zarr", mode="r+")
        for sub in range(start, end, self.batch_size):
            stop = min(sub + self.batch_size, end)
            x0 = torch.from_numpy(np.asarray(self.latents[sub:stop])).to(self.settings.device, torch.float32)
            depth = None if self.depth is None else torch.from_numpy(np.asarray(self.depth[sub:stop])).to(x0.device)
            bar.phase("inverting")
            states = invert_latents(unet, self.schedule, x0, self.embedding, self.grid, set(self.saved), bar,
                                    self.iterations, depth)
            # every saved timestep of these frames in one write (a Zarr call costs about a millisecond)
            trajectory[:, sub:stop] = torch.stack([states[t] for t in self.saved]).cpu().numpy()
            if self.reconstruction:
                bar.phase("reconstructing")
                clean = denoise_latents(unet, self.schedule, states[self.denoising[0]], self.embedding, self.denoising,
                                        bar, depth)
                clean_np = clean.float().cpu().numpy()
                open_array(path / "reconstruction_latents.zarr", mode="r+")[sub:stop] = clean_np
                open_array(path / "reconstruction.zarr", mode="r+")[sub:stop] = decode_latents(
                    self.pipe.vae, clean_np, self.settings.device, self.batch_size)

    def parts(self, unit: int) -> list[Part]:
        start, end = self.ranges[unit]
        stored = [Part("trajectory.zarr", start, end, axis=1)]
        if self.reconstruction:
            stored += [Part("reconstruction_latents.zarr", start, end), Part("reconstruction.zarr", start, end)]
        return stored

    def finalize(self) -> dict:
        frames = self.latents.shape[0]
        summary = {"timesteps": self.saved, "frames": frames, "unet_frame_evaluations": frames * self.evaluations}
        if self.reconstruction:
            summary["reconstruction_unet_frame_evaluations"] = frames * len(self.denoising)
        if self.reconstruction:
            summary.update(self.score_reconstruction())
            log.info(f"invert: reconstruction PSNR {summary['psnr_mean']:.2f} dB (mean over {summary['frames']} frames)")
        return summary

    def score_reconstruction(self) -> dict:
        """Per-frame PSNR against the source frames, latent RMSE, and reconstruction.mp4."""
        frames = open_array(self.settings.folder("frames", "frames.zarr"))
        recon = open_array(self.run.path / "reconstruction.zarr")
        recon_latents = open_array(self.run.path / "reconstruction_latents.zarr")
        scores, squared = [], 0.0
        for start, end in self.ranges:
            scores += [psnr(a, b) for a, b in zip(np.asarray(recon[start:end]), np.asarray(frames[start:end]))]
            squared += float(np.sum((np.asarray(recon_latents[start:end]) - np.asarray(self.latents[start:end])) ** 2))
        fps = Fraction(frames.attrs.get("fps", "24"))
        write_mp4(self.run.path / "reconstruction.mp4", (f for s, e in self.ranges for f in recon[s:e]), fps)
        # Latent RMSE isolates the inversion's error from the VAE's (PSNR includes both).
        return {"latent_rmse": round((squared / self.latents.size) ** 0.5, 6),
                "psnr": [round(v, 4) for v in scores], "psnr_mean": round(float(np.mean(scores)), 4)}

    def report(self, summary: dict) -> dict:
        return {"psnr_mean": summary.get("psnr_mean")}


def invert(settings: Settings, steps: int = 500, save_steps: int = 50, prompt: str | None = None,
           batch_size: int = 8, reconstruction: bool = True, method: str = "fixed-point", iterations: int = 2,
           reconstruction_grid: str = "editing") -> dict:
    return drive(Invert(settings, steps, save_steps, prompt, batch_size, reconstruction, method, iterations,
                        reconstruction_grid))
