"""What the UNet is fed: latents of training images (posterior samples) and text conditioning.

Both are computed once wherever they cannot change: posteriors of images whose pixels are fixed (all
class images; instance photos without random crop or flip), and prompt embeddings when the text encoder
is frozen.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vfx.dreambooth.data import ImageSet, read_images


@torch.no_grad()
def posterior(vae, pixels: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of [n, 3, r, r] pixels, in batches."""
    means, stds = [], []
    for start in range(0, len(pixels), batch):
        dist = vae.encode(pixels[start : start + batch].to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


class Latents:
    """Training latents of one image set: posterior samples, from cached posteriors when pixels are fixed."""

    def __init__(self, images: ImageSet | None, vae, cache: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.images, self.vae = images, vae
        self.scale = float(vae.config.scaling_factor)
        if cache is None and images.fixed:
            cache = posterior(vae, images.fixed_pixels())
        self.cache = cache

    @classmethod
    def from_files(cls, files: list[Path], resolution: int, vae, batch: int = 8) -> "Latents":
        """Cached posteriors of centre-cropped images, decoded a few at a time (hundreds of class
        images would not fit in memory as pixels)."""
        means, stds = [], []
        for start in range(0, len(files), batch):
            chunk = ImageSet.from_arrays(read_images(files[start : start + batch]), resolution)
            mean, std = posterior(vae, chunk.fixed_pixels())
            means.append(mean)
            stds.append(std)
        return cls(None, vae, (torch.cat(means), torch.cat(stds)))

    def sample(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        if self.cache is not None:
            mean, std = self.cache[0][indices], self.cache[1][indices]
        else:
            mean, std = posterior(self.vae, torch.stack([self.images.pixels(i, generator) for i in indices]))
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        return (mean + std * eps) * self.scale


def tokenize(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


class Conditioning:
    """Text embeddings for a batch of instance then class examples; computed once when the encoder is frozen."""

    def __init__(self, text_encoder, tokenizer, prompts: list[str], trained: bool):
        self.text_encoder, self.trained = text_encoder, trained
        device = next(text_encoder.parameters()).device
        self.ids = [tokenize(tokenizer, p).to(device) for p in prompts]
        self.cached = None if trained else [self.encode(ids) for ids in self.ids]

    def encode(self, ids: torch.Tensor, encoder=None) -> torch.Tensor:
        with torch.set_grad_enabled(self.trained and torch.is_grad_enabled()):
            return (encoder or self.text_encoder)(ids)[0]

    def batch(self, counts: list[int], encoder=None) -> torch.Tensor:
        if self.cached is not None:
            return torch.cat([e.expand(n, -1, -1) for e, n in zip(self.cached, counts) if n])
        ids = torch.cat([i.expand(n, -1) for i, n in zip(self.ids, counts) if n])
        return self.encode(ids, encoder)
