"""The TokenFlow edit loop: keyframe schedule, neighbour plans, and one denoising step over a video.

Per step, every UNet call carries [source | uncond | cond]. A random keyframe is drawn in each
window of `window` frames; the keyframes go through the UNet together with extended attention;
every other frame then goes through the UNet with its self-attention replaced by the matched,
blended keyframe outputs. Latents are read and written per chunk through callables, so memory
does not grow with the number of frames beyond the keyframe cache.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from vfx.diffusion.attention import Neighbours, TokenFlowState
from vfx.diffusion.controlnet import ControlGuide
from vfx.diffusion.correspondence import FlowCorrespondences
from vfx.diffusion.ddim import Schedule
from vfx.store import chunk_ranges

PROPAGATION_MODES = ("distance", "reference")


def draw_keyframes(frames: int, window: int, seed: int, step: int) -> list[int]:
    """One random keyframe inside each consecutive window (the last window may be shorter)."""
    rng = np.random.default_rng([seed, step])
    return [int(start + rng.integers(end - start)) for start, end in chunk_ranges(frames, window)]


def neighbours_by_distance(frames: list[int], keyframes: list[int]) -> Neighbours:
    """The keyframes on either side of each frame, weighted by real distance (a keyframe is its own)."""
    slots_a, slots_b, weights = [], [], []
    for frame in frames:
        right = bisect.bisect_left(keyframes, frame)
        if right < len(keyframes) and keyframes[right] == frame:
            a = b = right
            w = 1.0
        elif right == 0:
            a = b = 0
            w = 1.0
        elif right == len(keyframes):
            a = b = len(keyframes) - 1
            w = 1.0
        else:
            a, b = right - 1, right
            w = (keyframes[b] - frame) / (keyframes[b] - keyframes[a])
        slots_a.append(a)
        slots_b.append(b)
        weights.append(w)
    return Neighbours(torch.tensor(slots_a), torch.tensor(slots_b), torch.tensor(weights, dtype=torch.float64))


def neighbours_reference(frames: list[int], window: int) -> Neighbours:
    """The reference blend: the frame's own window's keyframe and the previous window's, weighted
    sigmoid(d2 / (d1 + d2)) by distances to the two window centres; window 0 uses its own only."""
    slots_a, slots_b, weights = [], [], []
    for frame in frames:
        index = frame // window
        if index == 0:
            slots_a.append(0)
            slots_b.append(0)
            weights.append(1.0)
            continue
        d1 = abs(frame - (index * window + window // 2))
        d2 = abs(frame - ((index - 1) * window + window // 2))
        slots_a.append(index)
        slots_b.append(index - 1)
        weights.append(1.0 / (1.0 + math.exp(-d2 / (d1 + d2))))
    return Neighbours(torch.tensor(slots_a), torch.tensor(slots_b), torch.tensor(weights, dtype=torch.float64))


@dataclass
class Embeddings:
    source: torch.Tensor  # [1, 77, d] inversion prompt
    uncond: torch.Tensor  # [1, 77, d] negative prompt
    cond: torch.Tensor  # [1, 77, d] edit prompt


@dataclass
class StepIO:
    """Reads and writes of one step: latents in, latents out, the source latents at this timestep."""

    read: Callable[[int, int], np.ndarray]
    read_frames: Callable[[list[int]], np.ndarray]
    read_source: Callable[[int, int], np.ndarray]
    read_source_frames: Callable[[list[int]], np.ndarray]
    write: Callable[[int, int, np.ndarray], None]
    read_control: Callable[[list[int]], np.ndarray] | None = None  # uint8 [m, H, W] edge maps of these frames


class TokenFlowEditor:
    """One denoising step over a video. Optional: a ControlNet guide for the edit branches, and
    correspondences from optical flow in place of feature matching."""

    def __init__(self, unet, schedule: Schedule, state: TokenFlowState, embeddings: Embeddings, guidance: float,
                 propagation: str, window: int, device: torch.device, frame_batch: int = 8,
                 control: ControlGuide | None = None, correspondences: FlowCorrespondences | None = None):
        self.unet, self.schedule, self.state = unet, schedule, state
        self.embeddings, self.guidance = embeddings, guidance
        self.propagation, self.window = propagation, window
        self.device, self.frame_batch = device, frame_batch
        self.control, self.correspondences = control, correspondences
        self.unet_frames = 0  # frame-evaluations (one frame, one branch, one UNet call)

    def branches(self, source: torch.Tensor, latents: torch.Tensor, timestep: int,
                 edges: np.ndarray | None = None) -> torch.Tensor:
        """One UNet call on [source | uncond | cond]; returns the guided model output for `latents`.
        With a ControlNet, `edges` (the frames' edge maps) condition the uncond and cond branches."""
        m = latents.shape[0]
        e = self.embeddings
        x = torch.cat([source, latents, latents]).to(self.unet.dtype)
        context = torch.cat([e.source.expand(m, -1, -1), e.uncond.expand(m, -1, -1), e.cond.expand(m, -1, -1)])
        extra = self.control.residuals(x, timestep, context, edges) if self.control is not None else {}
        out = self.unet(x, timestep, encoder_hidden_states=context, **extra).sample.float()
        self.unet_frames += 3 * m
        _, uncond, cond = out.chunk(3)
        return uncond + self.guidance * (cond - uncond)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, torch.float32)

    def _edges(self, io: StepIO, frames: list[int]) -> np.ndarray | None:
        return io.read_control(frames) if self.control is not None else None

    def _neighbours(self, frames: list[int], keyframes: list[int]) -> Neighbours:
        if self.propagation == "distance":
            return neighbours_by_distance(frames, keyframes)
        return neighbours_reference(frames, self.window)

    def _flow_maps(self, frames: list[int], keyframes: list[int]) -> dict | None:
        """Flow correspondences of `frames` to the keyframes they blend (None: feature matching only)."""
        if self.correspondences is None or not frames:
            return None
        plan = self._neighbours(frames, keyframes)
        pairs = {(f, keyframes[int(slot)]) for f, a, b in zip(frames, plan.slot_a, plan.slot_b) for slot in (a, b)}
        return self.correspondences.maps(pairs)

    @staticmethod
    def _with_flow(plan: Neighbours, frames: list[int], keyframes: list[int], maps: dict | None) -> Neighbours:
        if maps is not None:
            plan.given_a = [maps[(f, keyframes[int(a)])] for f, a in zip(frames, plan.slot_a)]
            plan.given_b = [maps[(f, keyframes[int(b)])] for f, b in zip(frames, plan.slot_b)]
        return plan

    @torch.no_grad()
    def step(self, io: StepIO, frames: int, chunk: int, keyframes: list[int], timestep: int, prev: int | None,
             on_phase: Callable[[str], None] = lambda text: None, chunks: Sequence[int] | None = None) -> None:
        """One denoising step: the keyframe pass, then propagation over `chunks` (default: all)."""
        state = self.state
        state.clear()
        on_phase("keyframes")
        state.mode = "keyframe"
        keyframe_latents = self._tensor(io.read_frames(keyframes))
        keyframe_output = self.branches(self._tensor(io.read_source_frames(keyframes)), keyframe_latents, timestep,
                                        self._edges(io, keyframes))
        reuse = self.propagation == "distance"  # a keyframe's propagated output is its own
        slot_of = {frame: slot for slot, frame in enumerate(keyframes)}
        state.mode = "propagate"
        ranges = chunk_ranges(frames, chunk)
        chunks = range(len(ranges)) if chunks is None else chunks
        for count, index in enumerate(chunks):
            start, end = ranges[index]
            on_phase(f"propagation {count + 1}/{len(chunks)}")
            latents = self._tensor(io.read(start, end))
            source = self._tensor(io.read_source(start, end))
            output = torch.empty_like(latents)
            todo = [f for f in range(start, end) if not (reuse and f in slot_of)]
            for f in range(start, end):
                if reuse and f in slot_of:
                    output[f - start] = keyframe_output[slot_of[f]]
            edges = self._edges(io, list(range(start, end)))
            maps = self._flow_maps(todo, keyframes)
            for sub in range(0, len(todo), self.frame_batch):
                batch = todo[sub : sub + self.frame_batch]
                rows = [f - start for f in batch]
                state.neighbours = self._with_flow(self._neighbours(batch, keyframes), batch, keyframes, maps)
                output[rows] = self.branches(source[rows], latents[rows], timestep,
                                             edges[rows] if edges is not None else None)
            result = self.schedule.denoise_step(output, latents, timestep, prev)
            io.write(start, end, result.cpu().numpy())
        state.mode = "plain"
        state.clear()
