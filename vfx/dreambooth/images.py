"""Generating images with classifier-free guidance, and storing them as PNGs that carry their provenance."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from vfx.fsutil import atomic_write_bytes

META_KEY = "vfx"


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int,
    guidance: float,
    width: int,
    height: int,
    negative_prompt: str = "",
) -> np.ndarray:
    """uint8 [n, H, W, 3], one image per (prompt, seed).

    The pipeline runs the unconditional and conditional halves of classifier-free guidance in one batch
    (it concatenates them for every UNet call). Each image's starting noise comes from its own CPU
    generator, so an image depends on its seed, not on the device or its batch-mates' seeds. An empty
    negative prompt is passed as none: the same for SD (it encodes ""), and SDXL then guides against
    zeros where its config says so (`force_zeros_for_empty_prompt`), as its own default does.
    """
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    result = pipe(
        prompt=list(prompts),
        negative_prompt=[negative_prompt] * len(prompts) if guidance > 1 and negative_prompt else None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        width=width,
        height=height,
        generator=generators,
        output_type="np",
    ).images
    return (np.clip(result, 0, 1) * 255).round().astype(np.uint8)


def png_bytes(image: np.ndarray, meta: dict | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if meta is not None:
        info.add_text(META_KEY, json.dumps(meta, sort_keys=True))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_png(path: Path, image: np.ndarray, meta: dict | None = None) -> bytes:
    """A lossless PNG written atomically, with `meta` in a text chunk; returns the bytes written."""
    data = png_bytes(image, meta)
    atomic_write_bytes(path, data)
    return data


def png_meta(path: Path) -> dict | None:
    """The metadata `write_png` stored, or None for a missing, foreign or damaged file."""
    try:
        with Image.open(path) as image:
            text = image.text.get(META_KEY) if hasattr(image, "text") else None
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def grid(images: list[np.ndarray], columns: int) -> np.ndarray:
    """Images of one size tiled row by row (missing cells stay black)."""
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    height, width = images[0].shape[:2]
    sheet = np.zeros((rows * height, columns * width, 3), np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        sheet[row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    return sheet


def native_size(pipe) -> int:
    """The model's native image side: the UNet's latent size times the VAE's downsampling factor."""
    from vfx.diffusion.text import native_pixel_size

    return native_pixel_size(pipe)[0]


def native_resolution(settings) -> int:
    """The native side of the model `settings` names, read from its configs when it is a folder."""
    from vfx import models

    return models.native_size(settings.model) or native_size(settings.pipeline())
