"""`vfx invert`: DDIM inversion of every frame's latent, saving the trajectory the edit stage reads.

`inversion/trajectory.zarr` is [T, N, 4, h, w] float32, chunked per (1, chunk, 4, h, w); axis 0
follows `attrs.timesteps` (descending: the final, noisiest latent first, then the editing
schedule's timesteps). Inversion is independent per frame, so it shards by frame chunk.
The reconstruction check denoises from the final latent over the same grid, decodes, and scores
PSNR against the source frames.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch

from vfx import log
from vfx.diffusion.ddim import Schedule
from vfx.diffusion.text import encode_prompt
from vfx.errors import BadInput
from vfx.media import write_mp4
from vfx.metrics import psnr
from vfx.stage import Part, StageRun, upstream
from vfx.stages.common import Settings, outcome, run_units, up_to_date_result
from vfx.stages.decode import decode_latents
from vfx.store import chunk_ranges, create_array, open_array

FOLDER = "inversion"


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


def unet_eval(unet, latents: torch.Tensor, timestep: int, embedding: torch.Tensor) -> torch.Tensor:
    """One UNet call for a batch of latents sharing one prompt embedding."""
    context = embedding.expand(latents.shape[0], -1, -1)
    return unet(latents.to(unet.dtype), timestep, encoder_hidden_states=context).sample.to(latents.dtype)


@torch.no_grad()
def invert_latents(unet, schedule: Schedule, latents: torch.Tensor, embedding: torch.Tensor, grid: list[int],
                   save: set[int], bar: log.Bar | None = None) -> dict[int, torch.Tensor]:
    """Run DDIM inversion up the ascending `grid`; return the latents at the `save` timesteps."""
    saved = {}
    x = latents
    current = None
    for timestep in grid:
        output = unet_eval(unet, x, timestep, embedding)
        x = schedule.invert_step(output, x, current, timestep)
        current = timestep
        if timestep in save:
            saved[timestep] = x.clone()
        if bar is not None:
            bar.advance(len(latents))
    return saved


@torch.no_grad()
def denoise_latents(unet, schedule: Schedule, noisy: torch.Tensor, embedding: torch.Tensor, grid_desc: list[int],
                    bar: log.Bar | None = None) -> torch.Tensor:
    """Deterministic DDIM sampling (no guidance) down the descending grid."""
    x = noisy
    for index, timestep in enumerate(grid_desc):
        prev = grid_desc[index + 1] if index + 1 < len(grid_desc) else None
        x = schedule.denoise_step(unet_eval(unet, x, timestep, embedding), x, timestep, prev)
        if bar is not None:
            bar.advance(len(noisy))
    return x


def invert(settings: Settings, steps: int = 500, save_steps: int = 50, prompt: str | None = None,
           batch_size: int = 8, reconstruction: bool = True) -> dict:
    if batch_size < 1:
        raise BadInput(f"invalid --batch-size {batch_size}: must be at least 1")
    latents_record = upstream(settings.project, "latents", "encode", "vfx encode {dir}")
    prompt = settings.project.get("prompt", prompt) or ""
    latents = open_array(settings.folder("latents", "latents.zarr"))
    count, channels, h, w = latents.shape
    chunk = latents.chunks[0]
    ranges = chunk_ranges(count, chunk)
    pipe = settings.pipeline()
    schedule = Schedule.from_pipeline(pipe)
    grid, saved = inversion_plan(schedule, steps, save_steps)
    params = {
        "model": settings.model.identity, "dtype": settings.dtype_name, "prompt": prompt, "steps": steps,
        "save_steps": save_steps, "reconstruction": reconstruction,
    }
    inputs = {"latents": latents_record["fingerprint"]}
    run = StageRun(settings.folder(FOLDER), "invert", params, inputs, len(ranges), force=settings.force, shard=settings.shard)
    if run.up_to_date() and not settings.force:
        return up_to_date_result(run, {"psnr_mean": run.folder.record().get("summary", {}).get("psnr_mean")})
    attrs = {
        "kind": "inversion-trajectory", "timesteps": saved, "prompt": prompt, "inversion_steps": steps,
        "save_steps": save_steps, "prediction_type": schedule.prediction_type,
        "scheduler": schedule.scheduler_config.get("_class_name", "DDIMScheduler"),
    }

    def create() -> None:
        create_array(run.path / "trajectory.zarr", (len(saved), count, channels, h, w), (1, chunk, channels, h, w), "float32", attrs)
        if reconstruction:
            create_array(run.path / "reconstruction_latents.zarr", (count, channels, h, w), (chunk, channels, h, w), "float32",
                         {"kind": "latents"})
            create_array(run.path / "reconstruction.zarr", (count, h * 8, w * 8, 3), (chunk, h * 8, w * 8, 3), "uint8",
                         {"kind": "frames"})

    pending = run.start(create)
    trajectory = open_array(run.path / "trajectory.zarr", mode="r+")
    embedding = encode_prompt(pipe, prompt) if pending else None
    unet = pipe.unet

    def work(unit: int, bar: log.Bar) -> list[np.ndarray]:
        start, end = ranges[unit]
        written = []
        for sub in range(start, end, batch_size):
            stop = min(sub + batch_size, end)
            x0 = torch.from_numpy(np.asarray(latents[sub:stop])).to(settings.device, torch.float32)
            bar.phase("inverting")
            states = invert_latents(unet, schedule, x0, embedding, grid, set(saved), bar)
            for index, timestep in enumerate(saved):
                trajectory[index, sub:stop] = states[timestep].cpu().numpy()
            if reconstruction:
                bar.phase("reconstructing")
                clean = denoise_latents(unet, schedule, states[grid[-1]], embedding, grid[::-1], bar)
                clean_np = clean.float().cpu().numpy()
                open_array(run.path / "reconstruction_latents.zarr", mode="r+")[sub:stop] = clean_np
                open_array(run.path / "reconstruction.zarr", mode="r+")[sub:stop] = decode_latents(
                    pipe.vae, clean_np, settings.device, batch_size)
        written.append(np.asarray(trajectory[:, start:end]))
        return written

    per_unit = chunk * len(grid) * (2 if reconstruction else 1)
    def parts(unit: int) -> list[Part]:
        start, end = ranges[unit]
        stored = [Part("trajectory.zarr", start, end, axis=1)]
        if reconstruction:
            stored += [Part("reconstruction_latents.zarr", start, end), Part("reconstruction.zarr", start, end)]
        return stored

    computed = run_units(run, pending, work, "invert", steps_per_unit=per_unit, unit_name="frame-steps", parts=parts)

    def finalize() -> dict:
        summary = {"timesteps": saved, "frames": count}
        if reconstruction:
            frames = open_array(settings.folder("frames", "frames.zarr"))
            recon = open_array(run.path / "reconstruction.zarr")
            recon_latents = open_array(run.path / "reconstruction_latents.zarr")
            scores, squared = [], 0.0
            for start, end in ranges:
                scores += [psnr(a, b) for a, b in zip(np.asarray(recon[start:end]), np.asarray(frames[start:end]))]
                squared += float(np.sum((np.asarray(recon_latents[start:end]) - np.asarray(latents[start:end])) ** 2))
            # Latent RMSE isolates the inversion's error from the VAE's (PSNR includes both).
            summary["latent_rmse"] = round((squared / latents.size) ** 0.5, 6)
            fps = Fraction(frames.attrs.get("fps", "24"))
            write_mp4(run.path / "reconstruction.mp4", (f for s, e in ranges for f in recon[s:e]), fps)
            summary.update(psnr=[round(v, 4) for v in scores], psnr_mean=round(float(np.mean(scores)), 4))
        return summary

    complete = run.finish(finalize)
    summary = (run.folder.record() or {}).get("summary", {}) if complete else {}
    if complete and "psnr_mean" in summary:
        log.info(f"invert: reconstruction PSNR {summary['psnr_mean']:.2f} dB (mean over {count} frames)")
    return outcome(run, complete, computed, {"psnr_mean": summary.get("psnr_mean")})
