"""ControlNet guidance for the edit: Canny edge maps of the source frames, and the residuals they add.

The ControlNet sees only the edit branches (uncond and cond, the same edge map for both, as
diffusers' ControlNet pipelines do under classifier-free guidance); the source branch gets zero
residuals, so it stays the inverted source and its tokens stay valid for correspondences.
Residuals reach the UNet through its public call arguments
(`down_block_additional_residuals`, `mid_block_additional_residual`).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from vfx.diffusion.text import Conditioning
from vfx.errors import BadInput
from vfx.opticalflow import to_grey

# What a ControlNet must share with the UNet for its residuals to fit the UNet's skip connections.
MATCHING_CONFIG = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types")


def canny(frame: np.ndarray, low: int, high: int) -> np.ndarray:
    """uint8 [H, W] edge map (0 or 255) of an RGB frame, OpenCV's Canny with hysteresis thresholds."""
    return cv2.Canny(to_grey(frame), low, high)


def check_matches(controlnet, unet, location: str) -> None:
    """A ControlNet built for another UNet shape would fail deep inside the UNet call: say so up front."""
    for key in MATCHING_CONFIG:
        mine, theirs = controlnet.config.get(key), unet.config.get(key)
        if isinstance(theirs, (list, tuple)) and isinstance(mine, (list, tuple)):
            mine, theirs = list(mine), list(theirs)
        if mine != theirs:
            raise BadInput(f"the ControlNet at {location} does not match the model's UNet: {key} is {mine}, the UNet's is {theirs}")


def condition_images(edges: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [m, H, W] edge maps -> [m, 3, H, W] in [0, 1], the ControlNet's conditioning input."""
    images = torch.from_numpy(np.ascontiguousarray(edges)).to(device, dtype) / 255.0
    return images[:, None].expand(-1, 3, -1, -1)


class ControlGuide:
    """A ControlNet and its scale: turns edge maps into the UNet's additional residuals."""

    def __init__(self, controlnet, scale: float):
        self.controlnet, self.scale = controlnet, scale
        self.frames = 0  # frame-evaluations of the ControlNet (one frame, one branch)

    def residuals(self, sample: torch.Tensor, timestep: int, condition: Conditioning, edges: np.ndarray) -> dict:
        """UNet keyword arguments for a [source | uncond | cond] batch of m frames each."""
        m = sample.shape[0] // 3
        images = condition_images(edges, sample.device, sample.dtype)
        down, mid = self.controlnet(
            sample[m:], timestep, **condition.rows(slice(m, None)).unet_kwargs(),
            controlnet_cond=torch.cat([images, images]), conditioning_scale=self.scale, return_dict=False,
        )
        self.frames += 2 * m

        def with_source(residual: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.zeros_like(residual[:m]), residual])

        return {
            "down_block_additional_residuals": [with_source(r) for r in down],
            "mid_block_additional_residual": with_source(mid),
        }
