"""Flow-guided correspondences (`edit --correspondence flow`): token indices from the flow stage.

For a frame f and a keyframe k, the flow from f to k is composed from consecutive flows
(forward flows when k lies after f, backward flows when before), and a pixel is unreliable when
any flow along the chain is occluded there or the composed flow leaves the frame. Per token grid
of the UNet, each token takes the mean flow of its reliable pixels and points at the token it
lands in; a token with too few reliable pixels, or landing outside the grid, gets -1: the
propagation falls back to feature matching for it.

Composition walks outwards from each keyframe, so every frame costs one warp per keyframe it needs,
and only the frames of one chunk are held at a time.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
import torch

from vfx.opticalflow import out_of_frame, warp

# A token keeps its flow correspondence when at least this share of its pixels is reliable.
MIN_RELIABLE = 0.5

TokenMaps = dict[int, torch.Tensor]  # tokens per layer (L) -> [L] keyframe token index, -1 = use features


@dataclass
class FlowFields:
    """Per-pair reads of the flow stage's arrays; pair t is frames (t, t+1)."""

    forward: Callable[[int], np.ndarray]  # float32 [2, H, W]: t -> t+1 on frame t's grid
    backward: Callable[[int], np.ndarray]  # float32 [2, H, W]: t+1 -> t on frame t+1's grid
    occluded_forward: Callable[[int], np.ndarray]  # bool [H, W]
    occluded_backward: Callable[[int], np.ndarray]  # bool [H, W]
    size: tuple[int, int]  # (H, W)

    @classmethod
    def from_arrays(cls, forward, backward, occluded_forward, occluded_backward) -> "FlowFields":
        """From numpy or Zarr arrays; Zarr chunks are read once and kept while a walk crosses them."""
        return cls(_pairs(forward, np.float32), _pairs(backward, np.float32), _pairs(occluded_forward, bool),
                   _pairs(occluded_backward, bool), tuple(forward.shape[2:]))


def _pairs(array, dtype) -> Callable[[int], np.ndarray]:
    size = getattr(array, "chunks", array.shape)[0]

    @functools.lru_cache(maxsize=2)
    def block(index: int) -> np.ndarray:
        return np.asarray(array[index * size : (index + 1) * size]).astype(dtype)

    return lambda t: block(t // size)[t % size]


def token_grids(height: int, width: int) -> list[tuple[int, int]]:
    """The token grids of an SD-shaped UNet on [height, width] latents: halved (rounding up) down to 1 x 1."""
    grids = [(height, width)]
    while grids[-1] != (1, 1):
        h, w = grids[-1]
        grids.append((math.ceil(h / 2), math.ceil(w / 2)))
    return grids


def compose(step: np.ndarray, step_occluded: np.ndarray, rest: np.ndarray, rest_occluded: np.ndarray):
    """Flow f -> k from flow f -> g (`step`, on f's grid) and flow g -> k (`rest`, on g's grid).

    Each pixel moves by `step`, then by `rest` where it landed; it is unreliable if either leg is.
    """
    moved = warp(np.ascontiguousarray(rest.transpose(1, 2, 0)), step).transpose(2, 0, 1)
    landed = warp(rest_occluded.astype(np.uint8), step, cv2.INTER_NEAREST) > 0
    total = step + moved
    return total, step_occluded | landed | out_of_frame(total)


def to_tokens(flow: np.ndarray, unreliable: np.ndarray, grids: list[tuple[int, int]]) -> TokenMaps:
    """Pixel flow f -> k and its unreliable pixels -> per grid, each token's index in keyframe k (-1: none)."""
    height, width = unreliable.shape
    reliable = (~unreliable).astype(np.float32)
    # Per-token means of the reliable share and of flow x reliable; their ratio is the mean reliable flow.
    # Each grid is averaged from the previous one (cheaper than from the pixels, the same where sizes halve).
    layers = np.concatenate([reliable[..., None], (flow * reliable).transpose(1, 2, 0)], axis=-1)
    maps = {}
    for gh, gw in grids:
        layers = cv2.resize(layers, (gw, gh), interpolation=cv2.INTER_AREA).reshape(gh, gw, 3)
        share = layers[..., 0]
        dx, dy = (layers[..., c] / np.maximum(share, 1e-6) for c in (1, 2))
        # A token's centre moves by its flow in token units (grid cells are width / gw pixels wide).
        cols = np.floor(np.arange(gw)[None, :] + dx * gw / width + 0.5).astype(np.int64)
        rows = np.floor(np.arange(gh)[:, None] + dy * gh / height + 0.5).astype(np.int64)
        usable = (share >= MIN_RELIABLE) & (cols >= 0) & (cols < gw) & (rows >= 0) & (rows < gh)
        maps[gh * gw] = torch.from_numpy(np.where(usable, rows * gw + cols, -1).reshape(-1))
    return maps


class FlowCorrespondences:
    """Token correspondences from frames to keyframes, composed from the flow stage's fields."""

    def __init__(self, fields: FlowFields, latent_size: tuple[int, int]):
        self.fields = fields
        self.grids = token_grids(*latent_size)
        self.identity = {gh * gw: torch.arange(gh * gw) for gh, gw in self.grids}

    def maps(self, pairs: set[tuple[int, int]]) -> dict[tuple[int, int], TokenMaps]:
        """Token maps for each (frame, keyframe) pair."""
        wanted: dict[tuple[int, int], set[int]] = defaultdict(set)  # (keyframe, direction) -> frames
        result = {}
        for frame, keyframe in pairs:
            if frame == keyframe:
                result[(frame, keyframe)] = self.identity
            else:
                wanted[(keyframe, 1 if frame > keyframe else -1)].add(frame)
        for (keyframe, direction), frames in wanted.items():
            result.update(self._walk(keyframe, direction, frames))
        return result

    def _walk(self, keyframe: int, direction: int, frames: set[int]) -> dict[tuple[int, int], TokenMaps]:
        """Compose outwards from `keyframe` (direction -1: earlier frames, +1: later) up to the farthest frame."""
        farthest = min(frames) if direction < 0 else max(frames)
        height, width = self.fields.size
        flow = np.zeros((2, height, width), np.float32)
        unreliable = np.zeros((height, width), bool)
        result = {}
        frame = keyframe
        while frame != farthest:
            frame += direction
            if direction < 0:  # frame -> frame + 1, then on to the keyframe
                step, step_occluded = self.fields.forward(frame), self.fields.occluded_forward(frame)
            else:  # frame -> frame - 1, then on to the keyframe
                step, step_occluded = self.fields.backward(frame - 1), self.fields.occluded_backward(frame - 1)
            flow, unreliable = compose(step, step_occluded, flow, unreliable)
            if frame in frames:
                result[(frame, keyframe)] = to_tokens(flow, unreliable, self.grids)
        return result
