"""Train the embedded tiny model's VAE, so that the demo's decoded frames look like the video.

The tiny model's UNet stays random; only its VAE is trained. The training images are natural
photographs shipped with scikit-image plus generated clips (moving shapes over smooth gradients and
textures); the shared test video is never read. The result goes to `vfx/assets/tiny_vae.safetensors`
(float16, with its latent scaling factor in the metadata), which `vfx.tiny_models.tiny_vae` loads.

    python scripts/train_tiny_vae.py                    # the shipped weights (about 45 min, 1 thread)
    python scripts/train_tiny_vae.py --steps 5 --out /tmp/vae.safetensors   # a quick check
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vfx.tiny_models import TINY_VAE_ASSET, bare_tiny_vae

CROP = 64
HELD_OUT = ("coffee", "chelsea")  # photographs kept out of training, for the PSNR printed at the end


def natural_images() -> dict[str, np.ndarray]:
    """scikit-image's bundled photographs as float RGB arrays in [0, 1] (grey ones repeated to RGB)."""
    import skimage.data

    wanted = ["astronaut", "brick", "camera", "coffee", "coins", "colorwheel", "grass",
                       "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon",
                       "page", "retina", "rocket", "text", "chelsea"]  # "cat" is chelsea again
    images = {}
    for name in wanted:
        try:
            image = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
        except Exception:  # an image that scikit-image would have to download: left out
            continue
        if image.max() > 1.5:
            image = image / 255.0
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        images[name] = np.ascontiguousarray(image[..., :3].clip(0, 1))
    return images


def generated_frame(rng: np.random.Generator, size: int, t: float) -> np.ndarray:
    """One frame of a synthetic clip: shapes and stripes moving over a smooth coloured background."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = rng.random(3), rng.random(3)
    angle = rng.random() * 2 * math.pi
    ramp = (np.cos(angle) * xs + np.sin(angle) * ys)[..., None]
    frame = a * (1 - ramp) + b * ramp
    for _ in range(rng.integers(1, 6)):
        cx, cy = rng.random(2) + t * (rng.random(2) - 0.5)
        rx, ry = 0.05 + 0.3 * rng.random(2)
        colour = rng.random(3)
        inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1
        if rng.random() < 0.3:  # striped shapes: fine detail the decoder must keep
            period = 0.02 + 0.1 * rng.random()
            inside &= np.sin((xs + ys) / period * math.pi) > 0
        frame[inside] = colour
    frame += rng.normal(0, 0.02 * rng.random(), frame.shape)
    return frame.clip(0, 1).astype(np.float32)


def random_crop(rng: np.random.Generator, image: np.ndarray) -> torch.Tensor:
    """A crop of random scale and position, resized to CROP pixels and randomly flipped."""
    h, w = image.shape[:2]
    side = int(min(h, w) * rng.uniform(0.3, 1.0))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = torch.from_numpy(image[y : y + side, x : x + side]).permute(2, 0, 1)[None]
    crop = F.interpolate(crop, size=CROP, mode="area" if side > CROP else "bilinear",
                         align_corners=None if side > CROP else False)[0]
    if rng.random() < 0.5:
        crop = crop.flip(2)
    return crop


def batch(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> torch.Tensor:
    """Three quarters photograph crops, one quarter generated frames."""
    items = []
    for _ in range(size):
        if rng.random() < 0.75:
            items.append(random_crop(rng, photos[rng.integers(len(photos))]))
        else:
            items.append(torch.from_numpy(generated_frame(rng, CROP, rng.random())).permute(2, 0, 1))
    return torch.stack(items).clamp(0, 1) * 2 - 1


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1]."""
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean())
    return 10 * math.log10(1 / max(mse, 1e-12))


@torch.no_grad()
def held_out_psnr(vae, images: dict[str, np.ndarray]) -> float:
    scores = []
    for image in images.values():
        x = torch.from_numpy(image).permute(2, 0, 1)[None]
        x = F.interpolate(x, size=(128, 128), mode="area") * 2 - 1
        scores.append(psnr(vae.decode(vae.encode(x).latent_dist.mean).sample, x))
    return float(np.mean(scores))


@torch.no_grad()
def unit_variance_scale(vae, photos: list[np.ndarray]) -> float:
    """SD's rule for the latent scaling factor: 1 / std of the posterior means of typical images."""
    rng = np.random.default_rng(1)
    x = batch(rng, photos, 64)
    return round(1.0 / float(vae.encode(x).latent_dist.mean.std()), 5)


def train(steps: int, batch_size: int, lr: float, seed: int, log_every: int):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = natural_images()
    held_out = {name: images.pop(name) for name in HELD_OUT if name in images}
    photos = list(images.values())
    vae = bare_tiny_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    started = time.time()
    for step in range(steps):
        x = batch(rng, photos, batch_size)
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample()).sample
        # L1 keeps edges sharper than MSE alone; the KL term is SD's tiny weight, which keeps the
        # latents bounded without costing detail.
        loss = F.l1_loss(y, x) + F.mse_loss(y, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  train PSNR {psnr(y.detach(), x):5.2f} dB  "
                  f"{time.time() - started:6.0f} s", flush=True)
    vae.eval()
    scale = unit_variance_scale(vae, photos)
    print(f"held-out PSNR at 128 px: {held_out_psnr(vae, held_out):.2f} dB; scaling factor {scale}")
    return vae, scale


def save(vae, scale: float, out: Path) -> None:
    from safetensors.torch import save_file

    state = {name: tensor.detach().half().contiguous() for name, tensor in vae.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"scaling_factor": str(scale),
                                         "trained_by": "scripts/train_tiny_vae.py"})
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", type=Path, default=TINY_VAE_ASSET)
    args = parser.parse_args()
    vae, scale = train(args.steps, args.batch_size, args.lr, args.seed, args.log_every)
    save(vae, scale, args.out)


if __name__ == "__main__":
    main()
