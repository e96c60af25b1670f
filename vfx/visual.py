"""Pictures for people: flow as colour."""

from __future__ import annotations

import cv2
import numpy as np


def flow_to_rgb(flow: np.ndarray) -> np.ndarray:
    """[2, H, W] flow -> RGB (hue: direction, value: magnitude normalised to the frame's maximum)."""
    dx, dy = flow[0].astype(np.float32), flow[1].astype(np.float32)
    magnitude, angle = cv2.cartToPolar(dx, dy, angleInDegrees=True)
    hsv = np.zeros(flow.shape[1:] + (3,), np.uint8)
    hsv[..., 0] = (angle / 2).astype(np.uint8)
    hsv[..., 1] = 255
    hsv[..., 2] = np.clip(magnitude / max(float(magnitude.max()), 1e-6) * 255, 0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
