"""What the UNet is fed: latents of training images (posterior samples), text conditioning, and for
SDXL each example's micro-conditioning (the photo's original size, the crop's top-left, the target size).

Latents and text are computed once wherever they cannot change: posteriors of images whose pixels are
fixed (all class images; instance photos without random crop or flip), and prompt embeddings when the
text encoders are frozen.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vfx.diffusion.text import Conditioning, encode_tokens
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

    def __init__(self, images: ImageSet | None, vae, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                 sizes: list[tuple[int, int]] | None = None, crops: list[tuple[int, int]] | None = None,
                 resolution: int | None = None):
        self.images, self.vae = images, vae
        self.scale = float(vae.config.scaling_factor)
        if cache is None and images.fixed:
            cache = posterior(vae, images.fixed_pixels())
        self.cache = cache
        # Each image's size before scaling (h, w), and its centre crop's top-left: SDXL's micro-conditioning.
        self.sizes = sizes if sizes is not None else images.sizes
        self.crops = crops if crops is not None else [images.centre_crop(i) for i in range(len(images))]
        self.resolution = resolution or images.resolution

    @classmethod
    def from_files(cls, files: list[Path], resolution: int, vae, batch: int = 8) -> "Latents":
        """Cached posteriors of centre-cropped images, decoded a few at a time (hundreds of class
        images would not fit in memory as pixels)."""
        means, stds, sizes, crops = [], [], [], []
        for start in range(0, len(files), batch):
            chunk = ImageSet.from_arrays(read_images(files[start : start + batch]), resolution)
            mean, std = posterior(vae, chunk.fixed_pixels())
            means.append(mean)
            stds.append(std)
            sizes += chunk.sizes
            crops += [chunk.centre_crop(i) for i in range(len(chunk))]
        return cls(None, vae, (torch.cat(means), torch.cat(stds)), sizes, crops, resolution)

    def sample(self, indices: list[int], generator: torch.Generator) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Posterior samples of the images `indices`, and where each one's crop starts (top, left)."""
        if self.cache is not None:
            mean, std = self.cache[0][indices], self.cache[1][indices]
            crops = [self.crops[i] for i in indices]
        else:
            drawn = [self.images.draw(i, generator) for i in indices]
            mean, std = posterior(self.vae, torch.stack([pixels for pixels, _ in drawn]))
            crops = [crop for _, crop in drawn]
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        return (mean + std * eps) * self.scale, crops

    def time_ids(self, indices: list[int], crops: list[tuple[int, int]]) -> torch.Tensor:
        """SDXL's micro-conditioning of these examples: [n, 6] = original (h, w), crop (top, left), target (r, r)."""
        r = self.resolution
        return torch.tensor([[*self.sizes[i], *crop, r, r] for i, crop in zip(indices, crops)], dtype=torch.float32)


def tokenize(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


class PromptConditioning:
    """Text conditioning for a batch of instance then class examples, through the model's text encoders
    (SDXL: two); computed once when the encoders are frozen."""

    def __init__(self, text_encoders: list, tokenizers: list, prompts: list[str], trained: bool):
        self.text_encoders, self.trained = text_encoders, trained
        device = next(text_encoders[0].parameters()).device
        self.ids = [[tokenize(t, p).to(device) for t in tokenizers] for p in prompts]  # [prompt][encoder]
        self.cached = None if trained else [self.encode(ids) for ids in self.ids]

    def encode(self, ids: list[torch.Tensor], encoders: list | None = None) -> Conditioning:
        with torch.set_grad_enabled(self.trained and torch.is_grad_enabled()):
            return encode_tokens(encoders or self.text_encoders, ids)

    def batch(self, counts: list[int], encoders: list | None = None, time_ids: torch.Tensor | None = None
              ) -> Conditioning:
        """`counts[k]` rows of prompt k, in order, with these examples' SDXL `time_ids` (which the UNet
        call gets only from an SDXL model's conditioning: one with pooled embeddings)."""
        if self.cached is not None:
            cond = Conditioning.cat([c.repeat(n) for c, n in zip(self.cached, counts) if n])
        else:
            ids = [torch.cat([prompt[k].expand(n, -1) for prompt, n in zip(self.ids, counts) if n])
                   for k in range(len(self.ids[0]))]
            cond = self.encode(ids, encoders)
        cond.time_ids = time_ids
        return cond
