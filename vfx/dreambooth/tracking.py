"""Watching training: a fixed evaluation loss, validation images, and the metrics log."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from vfx.fsutil import atomic_write_text
from vfx.dreambooth import checkpoint
from vfx.dreambooth.config import TrainConfig
from vfx.dreambooth.encoding import Latents, PromptConditioning, posterior
from vfx.dreambooth.images import generate, write_png
from vfx.dreambooth.objective import prediction_target

METRICS = "metrics.jsonl"


def eval_set(latents: Latents, pairs: int, seed: int, num_timesteps: int):
    """A fixed set of (clean latent, noise, timestep, micro-conditioning) rows: each instance image's centre
    crop at `pairs` spread timesteps."""
    mean = latents.cache[0] if latents.cache is not None else posterior(latents.vae, latents.images.fixed_pixels())[0]
    clean = (mean * latents.scale).repeat_interleave(pairs, dim=0)
    generator = torch.Generator().manual_seed(seed + 7919)  # its own stream: training randomness is untouched
    noise = torch.randn(clean.shape, generator=generator).to(clean.device)
    steps = torch.tensor([int((k + 0.5) * num_timesteps / pairs) for k in range(pairs)]).repeat(len(mean))
    time_ids = latents.time_ids(list(range(len(mean))), latents.crops).repeat_interleave(pairs, dim=0)
    return clean, noise, steps.to(clean.device), time_ids.to(clean.device)


@torch.no_grad()
def eval_loss(unet, conditioning: PromptConditioning, text_encoders: list, noise_scheduler, fixed,
              autocast=contextlib.nullcontext) -> float:
    """Mean instance MSE over the fixed evaluation set (eval mode, no dropout)."""
    clean, noise, steps, time_ids = fixed
    with evaluating(unet, *text_encoders):
        total = 0.0
        with autocast():
            for start in range(0, len(clean), 8):
                rows = slice(start, start + 8)
                x0, eps, t = clean[rows], noise[rows], steps[rows]
                cond = conditioning.batch([len(x0), 0], text_encoders, time_ids[rows])
                pred = unet(noise_scheduler.add_noise(x0, eps, t), t, **cond.unet_kwargs()).sample
                target = prediction_target(noise_scheduler, x0, eps, t)
                total += float(((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3)).sum())
    return total / len(clean)


@contextlib.contextmanager
def evaluating(unet, *text_encoders):
    """Eval mode for the duration (no dropout); then the UNet trains again and each encoder is as it was."""
    was_training = [encoder.training for encoder in text_encoders]
    unet.eval()
    for encoder in text_encoders:
        encoder.eval()
    try:
        yield
    finally:
        unet.train()
        for encoder, was in zip(text_encoders, was_training):
            encoder.train(was)


def validate(pipe, unet, text_encoders: list, cfg: TrainConfig, step: int, folder: Path, accelerator) -> np.ndarray:
    """Sample the validation prompt with the current weights into `folder`/step-XXXXXX/; returns the images
    (uint8 [n, H, W, 3]). The training RNGs are left as they were."""
    from vfx.dreambooth.weights import with_trained

    saved = checkpoint.rng_state()
    sampler = with_trained(pipe, unet, text_encoders)
    sampler.set_progress_bar_config(disable=True)
    with evaluating(unet, *text_encoders), accelerator.autocast():
        images = generate(sampler, [cfg.validation_prompt] * cfg.validation_images,
                          [cfg.seed + i for i in range(cfg.validation_images)], steps=cfg.validation_steps,
                          guidance=7.5, width=cfg.resolution, height=cfg.resolution)
    checkpoint.set_rng_state(*saved)
    out = folder / f"step-{step:06d}"
    for index, image in enumerate(images):
        write_png(out / f"{index:02d}.png", image, {"prompt": cfg.validation_prompt, "seed": cfg.seed + index,
                                                    "step": step})
    return images


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a blank or torn one (a kill mid-write)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


# metrics.jsonl's keys -> TensorBoard's grouped tags (a group is a section of TensorBoard's page).
BOARD_TAGS = {
    "loss": "loss/total", "instance_loss": "loss/instance", "prior_loss": "loss/prior",
    "eval_instance_loss": "loss/eval_instance", "lr": "lr/unet", "lr_text_encoder": "lr/text_encoder",
    "epoch": "progress/epoch", "step_seconds": "time/step_seconds",
}
BOARD = "tensorboard"


class Metrics:
    """metrics.jsonl and TensorBoard events (dreambooth/RUN/tensorboard/), written by the main process only.
    Both are flushed every step, so what a checkpoint covers is on disk before it."""

    def __init__(self, path: Path, active: bool, resume_step: int | None):
        self.path, self.active, self.board = path, active, None
        if not active:
            return
        kept = []
        if resume_step is not None and path.is_file():
            # Lines after the checkpoint belong to steps the resumed run will redo.
            kept = [line for line in path.read_text().splitlines() if _step_of(line) is not None
                    and _step_of(line) <= resume_step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.board = open_board(path.parent / BOARD, resume_step)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        for key, tag in BOARD_TAGS.items():
            if record.get(key) is not None:
                self.board.add_scalar(tag, record[key], record["step"])
        self.board.flush()

    def images(self, step: int, images: np.ndarray) -> None:
        """Validation images, one tag per image index: TensorBoard's slider then walks through the steps."""
        if not self.active:
            return
        for index, image in enumerate(images):
            self.board.add_image(f"validation/{index}", image, step, dataformats="HWC")
        self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def __enter__(self) -> "Metrics":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_board(folder: Path, resume_step: int | None):
    """A TensorBoard writer. A fresh run starts with no events; a resumed one purges the events after its
    checkpoint (TensorBoard hides steps >= purge_step), as the steps after it are redone."""
    from torch.utils.tensorboard import SummaryWriter

    if resume_step is None:
        shutil.rmtree(folder, ignore_errors=True)
    return SummaryWriter(str(folder), purge_step=None if resume_step is None else resume_step + 1)
