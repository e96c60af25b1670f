"""Watching training: a fixed evaluation loss, validation images, and the metrics log."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from vfx.fsutil import atomic_write_text
from vfx.dreambooth import checkpoint
from vfx.dreambooth.config import TrainConfig
from vfx.dreambooth.encoding import Conditioning, Latents, posterior
from vfx.dreambooth.images import generate, write_png
from vfx.dreambooth.objective import prediction_target

METRICS = "metrics.jsonl"


def eval_set(latents: Latents, pairs: int, seed: int, num_timesteps: int):
    """A fixed set of (clean latent, noise, timestep) triples: each instance image at `pairs` spread timesteps."""
    mean = latents.cache[0] if latents.cache is not None else posterior(latents.vae, latents.images.fixed_pixels())[0]
    clean = (mean * latents.scale).repeat_interleave(pairs, dim=0)
    generator = torch.Generator().manual_seed(seed + 7919)  # its own stream: training randomness is untouched
    noise = torch.randn(clean.shape, generator=generator).to(clean.device)
    steps = torch.tensor([int((k + 0.5) * num_timesteps / pairs) for k in range(pairs)]).repeat(len(mean))
    return clean, noise, steps.to(clean.device)


@torch.no_grad()
def eval_loss(unet, conditioning: Conditioning, text_encoder, noise_scheduler, fixed, autocast=contextlib.nullcontext) -> float:
    """Mean instance MSE over the fixed evaluation set (eval mode, no dropout)."""
    clean, noise, steps = fixed
    was_training = text_encoder.training
    unet.eval()
    text_encoder.eval()
    total = 0.0
    with autocast():
        for start in range(0, len(clean), 8):
            x0, eps, t = clean[start : start + 8], noise[start : start + 8], steps[start : start + 8]
            cond = conditioning.batch([len(x0), 0], text_encoder)
            pred = unet(noise_scheduler.add_noise(x0, eps, t), t, cond).sample
            target = prediction_target(noise_scheduler, x0, eps, t)
            total += float(((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3)).sum())
    unet.train()
    text_encoder.train(was_training)
    return total / len(clean)


def validate(pipe, unet, text_encoder, cfg: TrainConfig, step: int, folder: Path, accelerator) -> list[str]:
    """Sample the validation prompt with the current weights; the training RNGs are left as they were."""
    from diffusers import StableDiffusionPipeline

    saved = checkpoint.rng_state()
    sampler = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=text_encoder, tokenizer=pipe.tokenizer, unet=unet, scheduler=pipe.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    sampler.set_progress_bar_config(disable=True)
    was_training = text_encoder.training
    unet.eval()
    text_encoder.eval()
    with accelerator.autocast():
        images = generate(sampler, [cfg.validation_prompt] * cfg.validation_images,
                          [cfg.seed + i for i in range(cfg.validation_images)], steps=cfg.validation_steps,
                          guidance=7.5, width=cfg.resolution, height=cfg.resolution)
    unet.train()
    text_encoder.train(was_training)
    checkpoint.set_rng_state(*saved)
    out = folder / f"step-{step:06d}"
    paths = []
    for index, image in enumerate(images):
        path = out / f"{index:02d}.png"
        write_png(path, image, {"prompt": cfg.validation_prompt, "seed": cfg.seed + index, "step": step})
        paths.append(str(path))
    return paths


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a blank or torn one (a kill mid-write)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class Metrics:
    """metrics.jsonl (and TensorBoard when it is installed), written by the main process only."""

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
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            pass

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
