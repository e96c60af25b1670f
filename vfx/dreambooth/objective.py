"""The DreamBooth objective: noising, the regression target, SNR-γ weights and the prior-preservation loss."""

from __future__ import annotations

import torch


def draw_noise(shape: tuple[int, ...], generator: torch.Generator, offset_noise: float = 0.0) -> torch.Tensor:
    """Gaussian noise; offset noise adds a per-sample, per-channel constant so the model can learn
    overall brightness (plain noise never shifts an image's mean much)."""
    noise = torch.randn(shape, generator=generator)
    if offset_noise:
        noise = noise + offset_noise * torch.randn(shape[:2] + (1,) * (len(shape) - 2), generator=generator)
    return noise


def draw_timesteps(count: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (count,), generator=generator)


def prediction_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict, per the scheduler config: the noise, or the velocity (SD 2.x-v)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r} (epsilon and v_prediction are)")


def snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v."""
    ratio = snr(noise_scheduler, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (ratio + 1.0)
    return clipped / ratio


def dreambooth_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    n_instance: int,
    prior_weight: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, instance term, prior term) for a batch of instance examples followed by class examples.

    loss = MSE(instance) + prior_weight * MSE(class); the prior term is None when the batch has
    no class examples. Per-example weights (SNR-γ) scale each example's MSE.
    """
    wide = torch.promote_types(pred.dtype, torch.float32)  # half precision is upcast; float64 stays (tests)
    per_example = ((pred.to(wide) - target.to(wide)) ** 2).mean(dim=tuple(range(1, pred.dim())))
    if weights is not None:
        per_example = per_example * weights.to(per_example.device)
    instance = per_example[:n_instance].mean()
    if per_example.shape[0] == n_instance:
        return instance, instance, None
    prior = per_example[n_instance:].mean()
    return instance + prior_weight * prior, instance, prior
