"""Optical flow and occlusion: OpenCV DIS flow both ways, forward-backward occlusion check.

Flow fields use the artifact layout: float [2, H, W], channel 0 = dx, channel 1 = dy, in pixels.
A flow defined on frame A's grid points from A to B: pixel x of A is seen at x + w(x) in B.
Every function here works at any resolution, so the edit stage can reuse them on token grids.
"""

from __future__ import annotations

import cv2
import numpy as np

from vfx.errors import BadInput

METHOD = "opencv-dis"
PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
DEFAULT_PRESET = "medium"

# Forward-backward consistency (Sundaram et al. 2010, as used by Ruder et al. 2016):
# occluded where |w_f + w_b(x + w_f)|^2 > FB_REL (|w_f|^2 + |w_b(x + w_f)|^2) + FB_ABS.
FB_REL, FB_ABS = 0.01, 0.5
# Motion boundary: |grad u|^2 + |grad v|^2 > MB_REL |w|^2 + MB_ABS.
MB_REL, MB_ABS = 0.01, 0.002
# Recorded in flow/'s parameters: bump the version when a threshold or test changes.
OCCLUSION_RULE = "fb+boundary+out-of-frame/v1"
THRESHOLDS = {"fb_rel": FB_REL, "fb_abs": FB_ABS, "mb_rel": MB_REL, "mb_abs": MB_ABS}


def check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise BadInput(f"unknown flow preset {preset!r}: use {', '.join(PRESETS)}")
    return preset


def to_grey(frame: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] (or already grey [H, W]) -> uint8 grey, what DIS works on."""
    if frame.ndim == 2:
        return np.ascontiguousarray(frame, dtype=np.uint8)
    return cv2.cvtColor(np.ascontiguousarray(frame, dtype=np.uint8), cv2.COLOR_RGB2GRAY)


def dis_flow(source: np.ndarray, target: np.ndarray, preset: str = DEFAULT_PRESET) -> np.ndarray:
    """Dense flow from `source` to `target` (uint8 frames), float32 [2, H, W]."""
    # A fresh solver per call: no state carries over between pairs, so any shard split
    # of the pairs computes the same bytes as one process.
    solver = cv2.DISOpticalFlow_create(PRESETS[check_preset(preset)])
    flow = solver.calc(to_grey(source), to_grey(target), None)
    return np.ascontiguousarray(flow.transpose(2, 0, 1))


def _sample_grid(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The absolute sampling positions x + w(x) as cv2.remap maps."""
    _, height, width = flow.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return xs + flow[0].astype(np.float32), ys + flow[1].astype(np.float32)


def warp(image: np.ndarray, flow: np.ndarray, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Backward warping: out(x) = image(x + flow(x)), bilinear, edges replicated.

    `image` is [H, W] or [H, W, C] on the grid of the flow's target frame; `flow` is [2, H, W]
    on the output's grid. With the forward flow t -> t+1, warp(frame[t+1], flow) lines frame
    t+1 up with frame t. Positions that fall outside the image are unreliable: see out_of_frame.
    """
    if flow.ndim != 3 or flow.shape[0] != 2:
        raise ValueError(f"flow must be [2, H, W], got {flow.shape}")
    if image.shape[:2] != flow.shape[1:]:
        raise ValueError(f"image {image.shape[:2]} and flow {flow.shape[1:]} differ in size")
    map_x, map_y = _sample_grid(flow)
    source = image.astype(np.float32) if image.dtype == np.float16 else image
    if source.ndim == 2:
        return cv2.remap(np.ascontiguousarray(source), map_x, map_y, interpolation, borderMode=cv2.BORDER_REPLICATE)
    # The cv2 binding mangles arrays with many channels (and drops a lone channel axis): go by blocks.
    parts = []
    for start in range(0, source.shape[2], 64):
        block = np.ascontiguousarray(source[..., start : start + 64])
        out = cv2.remap(block, map_x, map_y, interpolation, borderMode=cv2.BORDER_REPLICATE)
        parts.append(out.reshape(block.shape))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)


def out_of_frame(flow: np.ndarray) -> np.ndarray:
    """bool [H, W]: where x + flow(x) leaves the frame (nothing there to compare with)."""
    map_x, map_y = _sample_grid(flow)
    _, height, width = flow.shape
    return (map_x < 0) | (map_x > width - 1) | (map_y < 0) | (map_y > height - 1)


def fb_inconsistent(flow: np.ndarray, reverse: np.ndarray) -> np.ndarray:
    """bool [H, W]: the forward-backward check fails (`reverse` is the flow the other way)."""
    fx, fy = flow.astype(np.float32)
    map_x, map_y = _sample_grid(flow)
    # The reverse flow where each pixel lands, one component at a time (no [H, W, 2] copies).
    bx, by = (cv2.remap(np.ascontiguousarray(c, dtype=np.float32), map_x, map_y, cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE) for c in reverse)
    mismatch = (fx + bx) ** 2 + (fy + by) ** 2
    return mismatch > FB_REL * (fx * fx + fy * fy + bx * bx + by * by) + FB_ABS


_CENTRAL = np.array([[-0.5, 0.0, 0.5]], np.float32)  # central difference, in pixels per pixel


def motion_boundary(flow: np.ndarray) -> np.ndarray:
    """bool [H, W]: the flow changes fast here (central differences, edges replicated)."""
    fx, fy = flow.astype(np.float32)
    gradient = np.zeros(fx.shape, np.float32)
    for component in (fx, fy):
        for kernel in (_CENTRAL, _CENTRAL.T):
            derivative = cv2.filter2D(component, -1, kernel, borderType=cv2.BORDER_REPLICATE)
            gradient += derivative * derivative
    return gradient > MB_REL * (fx * fx + fy * fy) + MB_ABS


def occlusion(flow: np.ndarray, reverse: np.ndarray) -> np.ndarray:
    """bool [H, W] on `flow`'s grid: True where `flow` is not a trustworthy correspondence.

    Occluded = forward-backward check fails, or a motion boundary, or the target leaves the frame.
    """
    return fb_inconsistent(flow, reverse) | motion_boundary(flow) | out_of_frame(flow)


def flow_pair(source: np.ndarray, target: np.ndarray, preset: str = DEFAULT_PRESET):
    """(forward, backward, occlusion_forward, occlusion_backward) for two consecutive frames."""
    forward = dis_flow(source, target, preset)
    backward = dis_flow(target, source, preset)
    return forward, backward, occlusion(forward, backward), occlusion(backward, forward)
