"""Deterministic DDIM (eta 0) steps in both directions, for any prediction type.

The model output is turned into (x0, eps) with the prediction type read from the scheduler
config (epsilon, v_prediction or sample), then moved to the target noise level:
x_target = sqrt(a_target) * x0 + sqrt(1 - a_target) * eps. Inversion interprets the output at
the current (lower) noise level and moves up, as diffusers' DDIMInverseScheduler does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vfx.errors import BadInput


@dataclass
class Schedule:
    """Noise levels of a scheduler config: alphas_cumprod, the level below the first step, prediction type."""

    alphas_cumprod: torch.Tensor
    final_alpha: float
    prediction_type: str
    scheduler_config: dict

    @classmethod
    def from_pipeline(cls, pipe) -> "Schedule":
        return cls.from_config(pipe.scheduler.config)

    @classmethod
    def from_config(cls, config: dict) -> "Schedule":
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(config)
        prediction = scheduler.config.prediction_type
        if prediction not in {"epsilon", "v_prediction", "sample"}:
            raise BadInput(f"unsupported prediction type {prediction!r} in the model's scheduler config")
        return cls(
            scheduler.alphas_cumprod.double(),
            float(scheduler.final_alpha_cumprod),
            prediction,
            dict(scheduler.config),
        )

    def timesteps(self, steps: int) -> list[int]:
        """The DDIM grid for `steps` steps, descending (the denoising order), per the config's spacing."""
        from diffusers import DDIMScheduler

        if steps < 1 or steps > self.num_train_timesteps:
            raise BadInput(f"invalid step count {steps}: must be between 1 and {self.num_train_timesteps}")
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps)
        return [int(t) for t in scheduler.timesteps]

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    def alpha(self, timestep: int | None) -> float:
        """alphas_cumprod at `timestep`; None means the level below the first step."""
        return self.final_alpha if timestep is None or timestep < 0 else float(self.alphas_cumprod[timestep])

    def split(self, output: torch.Tensor, sample: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from a model output at noise level `alpha`."""
        a, b = alpha**0.5, (1 - alpha) ** 0.5
        if self.prediction_type == "epsilon":
            return (sample - b * output) / a, output
        if self.prediction_type == "v_prediction":
            return a * sample - b * output, a * output + b * sample
        return output, (sample - a * output) / b

    @staticmethod
    def move(x0: torch.Tensor, eps: torch.Tensor, alpha: float) -> torch.Tensor:
        return alpha**0.5 * x0 + (1 - alpha) ** 0.5 * eps

    def denoise_step(self, output, sample, timestep: int, prev_timestep: int | None) -> torch.Tensor:
        """x_t -> x_prev (DDIM, eta 0)."""
        x0, eps = self.split(output, sample, self.alpha(timestep))
        return self.move(x0, eps, self.alpha(prev_timestep))

    def invert_step(self, output, sample, current: int | None, target: int) -> torch.Tensor:
        """x_current -> x_target (higher noise), the model having been called at `target`."""
        x0, eps = self.split(output, sample, self.alpha(current))
        return self.move(x0, eps, self.alpha(target))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        return self.move(x0, noise, self.alpha(timestep))
