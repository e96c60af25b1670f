"""DreamBooth metrics (Ruiz et al. 2023): CLIP-I, DINO and CLIP-T of generated samples vs real photos.

CLIP-I and DINO: mean cosine over every (generated, real) pair of image embeddings (CLIP image
embeddings, DINO ViT CLS tokens). CLIP-T: mean cosine between each sample and its prompt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vfx.errors import BadInput
from vfx.media import image_files, read_image


def read_folder(folder: Path, flag: str) -> tuple[list[str], list[np.ndarray]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"{flag} {folder}: no such folder")
    # `vfx sample` writes a contact sheet beside the samples: it is not a sample.
    files = [f for f in image_files(folder) if f.name != "grid.png"]
    if not files:
        raise BadInput(f"{flag} {folder} holds no images")
    return [f.name for f in files], [read_image(f) for f in files]


def eval_subject(
    samples: Path, real: Path, prompt: str | None = None, clip_path: Path | None = None,
    dino_path: Path | None = None, device: str = "cpu",
) -> dict:
    if clip_path is None and dino_path is None:
        raise BadInput("pass --clip PATH (CLIP-I, CLIP-T) and/or --dino PATH (DINO)")
    if prompt and clip_path is None:
        raise BadInput("CLIP-T needs --clip PATH")
    from vfx.similarity import Clip, Dino, cosines, mean_pairwise_cosine
    from vfx.runtime import resolve_device

    torch_device = resolve_device(device)
    sample_names, sample_images = read_folder(samples, "--samples")
    _, real_images = read_folder(real, "--real")
    result: dict = {"samples": len(sample_images), "real": len(real_images), "prompt": prompt, "per_sample": {}}
    per_sample = result["per_sample"]
    per_sample["file"] = sample_names
    if clip_path is not None:
        clip = Clip(clip_path, torch_device)
        generated, reference = clip.images(sample_images), clip.images(real_images)
        result["clip_i"] = mean_pairwise_cosine(generated, reference)
        per_sample["clip_i"] = cosines(generated, reference).mean(axis=1).tolist()
        if prompt:
            text = clip.texts([prompt])
            per_sample["clip_t"] = cosines(generated, text)[:, 0].tolist()
            result["clip_t"] = float(np.mean(per_sample["clip_t"]))
        result["clip_model"] = clip.identity
    if dino_path is not None:
        dino = Dino(dino_path, torch_device)
        generated, reference = dino.images(sample_images), dino.images(real_images)
        result["dino"] = mean_pairwise_cosine(generated, reference)
        per_sample["dino"] = cosines(generated, reference).mean(axis=1).tolist()
        result["dino_model"] = dino.identity
    return result
