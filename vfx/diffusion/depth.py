"""Depth maps for a depth-conditioned UNet (stable-diffusion-2-depth), as its diffusers pipeline makes them.

A DPT depth estimator (transformers' DPTForDepthEstimation) predicts each frame's relative depth; the
map is resized bicubically to the latent grid and scaled per frame to [-1, 1], and the UNet reads it as
a fifth input channel beside the latents, in every call and every branch. The estimator is the model's
own `depth_estimator/` (with `feature_extractor/`) or a DPT folder given as `--depth-model`.

Two differences from the depth pipeline: the frame size is read as (height, width) (the pipeline reads
numpy images' sizes transposed), and a frame of constant predicted depth maps to zeros instead of
dividing by zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vfx.errors import BadInput

DEPTH_FLAG = "--depth-model"


def with_depth(x: torch.Tensor, depth: torch.Tensor | None) -> torch.Tensor:
    """The UNet input: latents [n, 4, h, w] and, for a depth model, their depth maps [n, 1, h, w]."""
    return x if depth is None else torch.cat([x, depth.to(x.device, x.dtype)], dim=1)


@dataclass(frozen=True)
class DepthModelRef:
    """Where the depth estimator and its image processor are, and an identity for fingerprints."""

    estimator: Path
    processor: Path
    identity: str


def resolve_depth_model(model, spec: str | None) -> DepthModelRef:
    """`--depth-model` (a DPT folder holding its preprocessor_config.json, or a cached Hub id), or the
    model's own depth_estimator/ and feature_extractor/. Nothing is downloaded."""
    from vfx.models import pipeline_folder
    from vfx.similarity import model_folder, model_identity

    if spec:
        folder = model_folder(spec, DEPTH_FLAG)
        if not folder.is_dir():
            raise BadInput(f"{DEPTH_FLAG} {spec}: no such folder (a DPT model is a folder)")
        for name in ("config.json", "preprocessor_config.json"):
            if not (folder / name).is_file():
                raise BadInput(f"{DEPTH_FLAG} {spec}: not a DPT depth model folder (no {name})")
        return DepthModelRef(folder, folder, model_identity(folder))
    folder = pipeline_folder(model)
    if folder is None or not (folder / "depth_estimator" / "config.json").is_file():
        raise BadInput(f"model {model.spec!r} has no depth_estimator/: pass {DEPTH_FLAG} with a DPT folder "
                       "(e.g. a local copy of Intel/dpt-hybrid-midas)")
    return DepthModelRef(folder / "depth_estimator", folder / "feature_extractor", f"{model.identity}/depth_estimator")


def load_depth_model(ref: DepthModelRef, device: torch.device):
    """(estimator, image processor); the estimator in float32 (DPT-Hybrid's batch norms do not run in fp16)."""
    from transformers import DPTForDepthEstimation

    from vfx.similarity import quiet_transformers
    from vfx.tiny_models import dpt_image_processor_class

    quiet_transformers()
    try:
        estimator = DPTForDepthEstimation.from_pretrained(str(ref.estimator), local_files_only=True)
        processor = dpt_image_processor_class().from_pretrained(str(ref.processor), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a folder that is not a DPT
        raise BadInput(f"could not load a DPT depth model from {ref.estimator}: {type(exc).__name__}: {exc}") from None
    return estimator.to(device, torch.float32).eval(), processor


@torch.no_grad()
def depth_maps(estimator, processor, frames: np.ndarray, device: torch.device, latent_factor: int = 8) -> np.ndarray:
    """uint8 frames [n, H, W, 3] -> float32 depth maps [n, 1, H / f, W / f], each scaled to [-1, 1]."""
    height, width = frames.shape[1:3]
    pixels = processor(images=list(frames), return_tensors="pt").pixel_values.to(device, torch.float32)
    depth = estimator(pixels).predicted_depth.float()
    depth = torch.nn.functional.interpolate(depth[:, None], size=(height // latent_factor, width // latent_factor),
                                            mode="bicubic", align_corners=False)
    low = depth.amin(dim=(1, 2, 3), keepdim=True)
    span = depth.amax(dim=(1, 2, 3), keepdim=True) - low
    scaled = torch.where(span > 0, 2.0 * (depth - low) / span.clamp_min(torch.finfo(span.dtype).tiny) - 1.0,
                         torch.zeros_like(depth))
    return scaled.cpu().numpy()
