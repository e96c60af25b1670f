"""Pixel metrics: warp error, PSNR, SSIM. Frames are uint8 RGB [H, W, 3].

CLIP and DINO scores live in vfx/similarity.py (they need a model).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from vfx.opticalflow import warp

PSNR_IDENTICAL = 100.0  # PSNR of identical frames (instead of infinity, which JSON cannot hold)


def _unit(frame: np.ndarray) -> np.ndarray:
    return frame.astype(np.float32) / 255.0


def warp_error_pair(previous: np.ndarray, current: np.ndarray, flow: np.ndarray, occluded: np.ndarray) -> float | None:
    """Σ M‖O_{t-1} − warp(O_t)‖² / Σ M for one pair (Lai et al. 2018), RGB in [0, 1].

    `flow` is the *source* video's forward flow t-1 -> t ([2, H, W]) and `occluded` its occlusion
    mask on frame t-1's grid; ‖·‖² sums the three channels of a pixel. None when every pixel is
    occluded (nothing to measure).
    """
    valid = ~np.asarray(occluded, dtype=bool)
    count = int(valid.sum())
    if count == 0:
        return None
    warped = warp(_unit(current), np.asarray(flow, dtype=np.float32))
    squared = ((_unit(previous) - warped) ** 2).sum(axis=-1)
    return float(squared[valid].sum(dtype=np.float64) / count)


def mean_defined(values) -> float | None:
    """Mean of the values that are not None (None when there are none)."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 frames (PSNR_IDENTICAL when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0:
        return PSNR_IDENTICAL
    return min(PSNR_IDENTICAL, 10.0 * math.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004): 11x11 Gaussian window, σ 1.5, K1 0.01, K2 0.03,
    data range 255, computed per channel and averaged (skimage's `gaussian_weights=True` setup)."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x, y = a.astype(np.float64), b.astype(np.float64)

    def blur(img: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(img, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(score.mean())
