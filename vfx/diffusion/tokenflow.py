"""The TokenFlow edit loop: keyframe schedule, neighbour plans, and one denoising step over a video.

Per step, every UNet call carries [source | uncond | cond]. A random keyframe is drawn in each
window of `window` frames; the keyframes go through the UNet together with extended attention;
every other frame goes through the UNet with its self-attention replaced by the matched, blended
keyframe outputs — the first of them in the keyframes' own call when the keyframes leave room in a
call of `frame_batch` frames. The editor alone drives the attention processors: it builds one
processor dict per kind of call once, puts it on, and describes each UNet call (its branch layout,
its injection switches, its keyframes, its propagation plan) to them. Latents are read and written
per chunk through callables, a bounded slice at a time, so memory does not grow with the number of
frames beyond the keyframe cache.
"""

from __future__ import annotations

import bisect
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from vfx.diffusion.attention import (Branches, Call, Neighbours, ProcessorContext, conv_hook, find_layers,
                                    processor_dicts)
from vfx.diffusion.controlnet import ControlGuide
from vfx.diffusion.correspondence import FlowCorrespondences
from vfx.diffusion.ddim import Schedule
from vfx.diffusion.depth import with_depth
from vfx.diffusion.text import Conditioning
from vfx.store import chunk_ranges

PROPAGATION_MODES = ("distance", "reference")
# Latents move between the step and its Zarr buffers in calls of up to this many bytes: a short video's
# in one call each way, a long one's in slices of this size (each Zarr call costs about a millisecond).
IO_BYTES = 64 << 20


def chunks_per_io(chunk_bytes: int) -> int:
    """How many consecutive chunks of `chunk_bytes` one read or write of a step moves."""
    return max(1, IO_BYTES // max(1, chunk_bytes))


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
    source: Conditioning  # one row each: the inversion prompt
    uncond: Conditioning  # the negative prompt
    cond: Conditioning  # the edit prompt


@dataclass
class StepIO:
    """Reads and writes of one step: latents in, latents out, the source latents at this timestep."""

    read: Callable[[int, int], np.ndarray]
    read_frames: Callable[[list[int]], np.ndarray]
    read_source: Callable[[int, int], np.ndarray]
    read_source_frames: Callable[[list[int]], np.ndarray]
    write: Callable[[int, int, np.ndarray], None]
    read_control: Callable[[list[int]], np.ndarray] | None = None  # uint8 [m, H, W] edge maps of these frames
    read_depth: Callable[[list[int]], np.ndarray] | None = None  # float32 [m, 1, h, w] depth maps (depth models)


class TokenFlowEditor:
    """One denoising step over a video, and the only thing that installs and drives the attention
    processors. Optional: a ControlNet guide for the edit branches, correspondences from optical flow
    in place of feature matching, `query_slice` keyframes per extended-attention query slice (0: all
    at once), and a `trace` dict where propagation records its matched indices per layer (tests)."""

    def __init__(self, unet, schedule: Schedule, embeddings: Embeddings, guidance: float, propagation: str,
                 window: int, device: torch.device, frame_batch: int = 16, control: ControlGuide | None = None,
                 correspondences: FlowCorrespondences | None = None, query_slice: int = 0, trace: dict | None = None):
        self.unet, self.schedule = unet, schedule
        self.embeddings, self.guidance = embeddings, guidance
        self.propagation, self.window = propagation, window
        self.device, self.frame_batch = device, frame_batch
        self.control, self.correspondences = control, correspondences
        self.unet_frames = 0  # frame-evaluations (one frame, one branch, one UNet call)
        self.layers = find_layers(unet)
        self.dtype = unet.dtype  # read once: the property walks every parameter
        self._context = ProcessorContext()
        self._processors = processor_dicts(unet, self.layers, self._context, query_slice, trace)  # built once
        self._attn1 = {name: unet.get_submodule(name.removesuffix(".processor")) for name in self.layers.self_attention}
        self._previous: dict | None = None  # the UNet's processors when `hooked` began
        self._hook = None
        self._installed: str | None = None  # the kind of call whose processors are on the self-attentions

    @property
    def injections(self) -> dict[str, int]:
        """PnP injections so far: "attention" per injected layer and UNet call, "conv" per UNet call."""
        return dict(self._context.injections)

    @contextmanager
    def hooked(self) -> Iterator["TokenFlowEditor"]:
        """Hook the PnP conv for the duration; the editor's processors go on at its first call and stay
        until the end, when the processors the UNet had on entry are put back. Re-entrant: `step` and
        `plain_call` inside it hook nothing more."""
        if self._hook is not None:
            yield self
            return
        self._previous = dict(self.unet.attn_processors)
        conv = self.unet.get_submodule(self.layers.injected_conv)
        self._hook = conv.register_forward_hook(conv_hook(self._context))
        try:
            yield self
        finally:
            self._hook.remove()
            self._hook = None
            self.unet.set_attn_processor(dict(self._previous))
            self._installed = None
            self._previous = None

    def _install(self, kind: str) -> None:
        """The processors of calls of `kind` ("frame", "tokenflow") on the self-attentions, if not already.
        Set module by module: a whole-UNet `set_attn_processor` per switch walks every module."""
        if self._installed is None:
            self.unet.set_attn_processor(dict(self._processors[kind]))  # it pops from the dict it is given
        elif self._installed != kind:
            for name, module in self._attn1.items():
                module.set_processor(self._processors[kind][name])
        self._installed = kind

    def _branches(self, source: torch.Tensor, latents: torch.Tensor, timestep: int, edges: np.ndarray | None, *,
                  inject_attention: bool, inject_conv: bool, keyframes: int = 0,
                  neighbours: Neighbours | None = None, depth: np.ndarray | None = None) -> torch.Tensor:
        """One UNet call on [source | uncond | cond], described to the processors as such (the first
        `keyframes` frames being the step's keyframes); returns the guided model output for `latents`.
        With a ControlNet, `edges` (the frames' edge maps) condition the uncond and cond branches; a
        depth model reads the frames' `depth` maps in every branch."""
        m = latents.shape[0]
        if source.shape[0] != m:
            raise ValueError(f"{source.shape[0]} source frames for {m} frames")
        e = self.embeddings
        x = torch.cat([source, latents, latents])
        if depth is not None:
            x = with_depth(x, self._tensor(depth).repeat(3, 1, 1, 1))
        x = x.to(self.dtype)
        condition = Conditioning.cat([e.source.repeat(m), e.uncond.repeat(m), e.cond.repeat(m)])
        extra = self.control.residuals(x, timestep, condition, edges) if self.control is not None else {}
        self._context.call = Call(Branches(m), inject_attention, inject_conv, keyframes, neighbours)
        try:
            out = self.unet(x, timestep, **condition.unet_kwargs(), **extra).sample.float()
        finally:
            self._context.call = None
        self.unet_frames += 3 * m
        _, uncond, cond = out.chunk(3)
        return uncond + self.guidance * (cond - uncond)

    @torch.no_grad()
    def plain_call(self, source: torch.Tensor, latents: torch.Tensor, timestep: int, edges: np.ndarray | None = None,
                   *, inject_attention: bool = False, inject_conv: bool = False,
                   depth: np.ndarray | None = None) -> torch.Tensor:
        """The guided model output of one UNet call with per-frame attention in every branch (the naive
        per-frame PnP baseline). Inside `hooked`, the per-frame processors stay on until it ends."""
        with self.hooked():
            self._install("frame")
            return self._branches(source, latents, timestep, edges, inject_attention=inject_attention,
                                  inject_conv=inject_conv, depth=depth)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, torch.float32)

    def _edges(self, io: StepIO, frames: list[int]) -> np.ndarray | None:
        return io.read_control(frames) if self.control is not None else None

    @staticmethod
    def _depth(io: StepIO, frames: list[int]) -> np.ndarray | None:
        return io.read_depth(frames) if io.read_depth is not None else None

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

    def _propagation_plan(self, frames: int, keyframes: list[int]) -> tuple[list[int], list[list[int]]]:
        """The frames to propagate, in order: (those that share the keyframes' UNet call, the batches of
        `frame_batch` after it). The keyframes' call holds `frame_batch` frames in all when the keyframes
        leave room, which saves a call per step. Batches cross chunk boundaries, so every call is full;
        the plan depends on nothing but the frames and keyframes, so a rank that owns some chunks runs
        the same calls (the same bytes) as one process that owns them all."""
        skip = set(keyframes) if self.propagation == "distance" else set()  # a keyframe's output is its own
        todo = [f for f in range(frames) if f not in skip]
        joined = todo[: max(0, self.frame_batch - len(keyframes))]
        rest = todo[len(joined):]
        return joined, [rest[i : i + self.frame_batch] for i in range(0, len(rest), self.frame_batch)]

    @torch.no_grad()
    def step(self, io: StepIO, frames: int, chunk: int, keyframes: list[int], timestep: int, prev: int | None,
             on_phase: Callable[[str], None] = lambda text: None, chunks: Sequence[int] | None = None, *,
             inject_attention: bool = False, inject_conv: bool = False) -> None:
        """One denoising step: the keyframe pass, then propagation and the denoised write of each chunk in
        `chunks` (default: all). PnP injects the source's q/k (`inject_attention`) and conv features
        (`inject_conv`) in this step or not."""
        inject = {"inject_attention": inject_attention, "inject_conv": inject_conv}
        cache = self._context.cache
        with self.hooked():
            cache.clear()
            try:
                on_phase("keyframes")
                self._install("tokenflow")
                latents = self._tensor(io.read_frames(keyframes))
                source = self._tensor(io.read_source_frames(keyframes))
                ranges = chunk_ranges(frames, chunk)
                chunks = range(len(ranges)) if chunks is None else chunks
                per_io = chunks_per_io(latents[0].numel() * latents.element_size() * chunk)
                pass_ = _PropagationPass(self, io, frames, ranges, keyframes, timestep, inject, chunks, per_io)
                pass_.run_keyframes(latents, source)
                writer = _BlockWriter(io.write, per_io)
                for count, index in enumerate(chunks):
                    on_phase(f"propagation {count + 1}/{len(chunks)}")
                    start, end = ranges[index]
                    output = pass_.outputs(start, end)
                    result = self.schedule.denoise_step(output, pass_.latents.chunk(index), timestep, prev)
                    writer.add(start, end, result.cpu().numpy())
                    pass_.release_through(index)
                writer.flush()
            finally:
                cache.clear()

    def _call(self, io: StepIO, keyframes: list[int], lead: int, frames: list[int], latents: torch.Tensor,
              source: torch.Tensor, timestep: int, inject: dict) -> torch.Tensor:
        """The guided outputs of one TokenFlow UNet call over `frames` (their latents and source latents
        given): the first `lead` are the step's keyframes (extended attention, filling the keyframe cache),
        the others have their self-attention propagated from the keyframes."""
        others = frames[lead:]
        plan = None
        if others:
            plan = self._with_flow(self._neighbours(others, keyframes), others, keyframes,
                                   self._flow_maps(others, keyframes))
        return self._branches(source, latents, timestep, self._edges(io, frames), keyframes=lead, neighbours=plan,
                              depth=self._depth(io, frames), **inject)


class _ChunkRows:
    """Frames of one stored array as tensors, read `per_read` whole chunks at a time (within the chunks
    `span` the step writes; a chunk outside it, alone) and kept until released."""

    def __init__(self, read: Callable[[int, int], np.ndarray], ranges: list[tuple[int, int]], to_tensor,
                 span: Sequence[int], per_read: int):
        self.read, self.ranges, self.to_tensor = read, ranges, to_tensor
        self.span, self.per_read = span, per_read
        self.starts = [start for start, _ in ranges]
        self.held: dict[int, torch.Tensor] = {}

    def chunk(self, index: int) -> torch.Tensor:
        if index not in self.held:
            last = min(index + self.per_read, self.span[-1] + 1) if index in self.span else index + 1
            block = self.to_tensor(self.read(self.ranges[index][0], self.ranges[last - 1][1]))
            sizes = [end - start for start, end in self.ranges[index:last]]
            self.held.update(zip(range(index, last), block.split(sizes)))
        return self.held[index]

    def frames(self, frames: list[int]) -> torch.Tensor:
        picked = []
        for frame in frames:
            index = bisect.bisect_right(self.starts, frame) - 1
            picked.append(self.chunk(index)[frame - self.starts[index]])
        return torch.stack(picked)

    def release_through(self, index: int) -> None:
        for held in [i for i in self.held if i <= index]:
            del self.held[held]


class _BlockWriter:
    """A step's denoised chunks, written `per_write` consecutive chunks per call."""

    def __init__(self, write: Callable[[int, int, np.ndarray], None], per_write: int):
        self.write, self.per_write = write, per_write
        self.pending: list[tuple[int, int, np.ndarray]] = []

    def add(self, start: int, end: int, array: np.ndarray) -> None:
        if self.pending and (self.pending[-1][1] != start or len(self.pending) == self.per_write):
            self.flush()
        self.pending.append((start, end, array))

    def flush(self) -> None:
        if self.pending:
            self.write(self.pending[0][0], self.pending[-1][1], np.concatenate([a for _, _, a in self.pending]))
            self.pending = []


class _PropagationPass:
    """The propagation pass of one step, chunk by chunk: each chunk's outputs come from the calls that
    hold its frames (the keyframes' call, else a batch run when first needed, over chunk boundaries)
    and, with distance propagation, from the keyframes' own outputs. Memory holds a batch and the
    chunks read with the ones it touches (at most IO_BYTES of them), not the video."""

    def __init__(self, editor: TokenFlowEditor, io: StepIO, frames: int, ranges: list[tuple[int, int]],
                 keyframes: list[int], timestep: int, inject: dict, chunks: Sequence[int], per_read: int):
        self.editor, self.io, self.keyframes, self.timestep, self.inject = editor, io, keyframes, timestep, inject
        self.latents = _ChunkRows(io.read, ranges, editor._tensor, chunks, per_read)
        self.source = _ChunkRows(io.read_source, ranges, editor._tensor, chunks, per_read)
        self.joined, self.batches = editor._propagation_plan(frames, keyframes)
        self.batch_of = {frame: b for b, batch in enumerate(self.batches) for frame in batch}
        self.own: dict[int, torch.Tensor] = {}  # keyframe -> its guided output
        self.ran: set[int] = set()  # the batches run so far
        self.done: dict[int, torch.Tensor] = {}  # frame -> guided output, until its chunk is written

    def run_keyframes(self, latents: torch.Tensor, source: torch.Tensor) -> None:
        """The keyframe pass (the keyframes' latents and source latents given), with the frames that join
        its call. Every rank runs it whole, so the keyframe cache holds the same bytes on every rank."""
        count, joined = len(self.keyframes), self.joined
        if joined:
            latents = torch.cat([latents, self.latents.frames(joined)])
            source = torch.cat([source, self.source.frames(joined)])
        out = self.editor._call(self.io, self.keyframes, count, self.keyframes + joined, latents, source,
                                self.timestep, self.inject)
        # a keyframe that is propagated too (reference propagation) takes its propagated output
        self.own = {k: o for k, o in zip(self.keyframes, out[:count]) if k not in self.batch_of and k not in joined}
        self.done.update(zip(joined, out[count:]))

    def outputs(self, start: int, end: int) -> torch.Tensor:
        """[end - start, C, h, w]: the guided outputs of frames [start, end)."""
        for b in sorted({self.batch_of[f] for f in range(start, end) if f in self.batch_of} - self.ran):
            batch = self.batches[b]
            self.ran.add(b)
            out = self.editor._call(self.io, self.keyframes, 0, batch, self.latents.frames(batch),
                                    self.source.frames(batch), self.timestep, self.inject)
            self.done.update(zip(batch, out))
        return torch.stack([self.done.pop(f) if f in self.done else self.own[f] for f in range(start, end)])

    def release_through(self, index: int) -> None:
        """Chunk `index` is written: every call touching the chunks up to it has run, so they are not
        read again (chunks are written in order)."""
        self.latents.release_through(index)
        self.source.release_through(index)
