"""TokenFlow's attention processors and the PnP feature hook, on diffusers' public APIs.

Every UNet call the editor makes carries [source | uncond | cond], n frames each (`Branches`); the
editor describes the call under way (`Call`: the layout, the injection switches, the keyframes, the
propagation plan) on a `ProcessorContext` shared with its processors, and puts the processors of the
kind of call on every self-attention (`attn1`) with `unet.set_attn_processor`:

- `FrameAttnProcessor`: per-frame attention in every branch (the naive per-frame PnP baseline).
- `TokenFlowAttnProcessor`: the TokenFlow passes. The call's first `keyframes` frames of every branch
  are the step's keyframes: extended attention, where the source branch attends within its own frame
  and each edit branch attends to the keys/values of all keyframes at once (one shared K/V sequence
  through SDPA, no repetition); the source branch's input tokens and every branch's outputs are cached
  per layer. The call's other frames get no attention: each frame's tokens are matched (cosine
  similarity of the source branch's input tokens, argmax) to its neighbouring keyframes' tokens, and
  the output is the matched keyframe outputs blended by the frame's weights. Correspondences given from
  outside (optical flow) take the place of the matching wherever they are defined. A call holds
  keyframes only (the keyframe pass), other frames only (propagation), or both: within each layer the
  keyframes' outputs are cached before the other frames read them, so the keyframes can share a call
  with the first frames they feed.

Plug-and-play injection replaces the edit branches' queries and keys by the source branch's in the
decoder's self-attentions, and the output of `conv2` of one decoder resnet by the source branch's
(a forward hook, before the residual sum). A batch that is not the described layout is refused,
never reinterpreted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from vfx.diffusion.cross_attention import merge_heads, shared_text_processors, split_heads


@dataclass
class Neighbours:
    """Per frame of a propagation batch: keyframe slots a and b and the weight of a (b gets 1 - w)."""

    slot_a: torch.Tensor  # [m] long
    slot_b: torch.Tensor  # [m] long
    weight_a: torch.Tensor  # [m] float
    # Optional given correspondences per frame: tokens per layer -> [L] index into keyframe a's (b's) tokens,
    # -1 where none is given (those tokens are matched by features).
    given_a: list[dict[int, torch.Tensor]] | None = None
    given_b: list[dict[int, torch.Tensor]] | None = None


@dataclass
class UNetLayers:
    """The layers TokenFlow and PnP act on, found by walking the UNet."""

    self_attention: list[str]  # processor names of every attn1
    injected_attention: list[str]  # decoder attn1 whose q/k get the source's
    injected_conv: str  # module path of the decoder resnet conv2 whose output gets the source's


def find_layers(unet) -> UNetLayers:
    """PnP's reference choice, located structurally: every self-attention of the decoder's cross-attention
    up blocks except those of the first block's first attention module gets q/k injection, and the first
    such block's resnet 1 gets feature injection at its conv2.

    SD 1.x/2.x (one transformer per module): up_blocks 1-3 but up_blocks[1].attentions[0], and
    up_blocks[1].resnets[1] (a quarter of the latent's side). SDXL has attention at two levels only:
    up_blocks[0] (a quarter of the latent's side, 10 transformers per module) and up_blocks[1] (half,
    2 each); the same rule injects the 20 self-attentions of up_blocks[0].attentions[1:] and the 6 of
    up_blocks[1], and the features of up_blocks[0].resnets[1], at the same quarter resolution as SD's."""
    self_attention = [name for name in unet.attn_processors if name.endswith("attn1.processor")]
    attn_up = [i for i, block in enumerate(unet.up_blocks) if getattr(block, "attentions", None)]
    if not attn_up:
        raise ValueError("the UNet has no cross-attention up blocks; PnP injection needs an SD-shaped UNet")
    first = attn_up[0]
    injected = []
    for i in attn_up:
        for j, attention in enumerate(unet.up_blocks[i].attentions):
            if i == first and j == 0:
                continue
            injected += [f"up_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn1.processor"
                         for k in range(len(attention.transformer_blocks))]
    resnet = 1 if len(unet.up_blocks[first].resnets) > 1 else 0
    return UNetLayers(self_attention, injected, f"up_blocks.{first}.resnets.{resnet}.conv2")


@dataclass(frozen=True)
class Branches:
    """The batch layout of one UNet call: the ORDER branches stacked along dim 0, `n` frames each."""

    n: int
    ORDER: ClassVar[tuple[str, ...]] = ("source", "uncond", "cond")

    def rows(self, branch: int) -> slice:
        """The rows of branch `branch` (an index into ORDER)."""
        return slice(branch * self.n, (branch + 1) * self.n)

    def check(self, x: torch.Tensor) -> None:
        """Refuse a batch that is not this layout ([3n, ...])."""
        if x.shape[0] != len(self.ORDER) * self.n:
            raise ValueError(f"expected a batch of {len(self.ORDER)} branches x {self.n} frames "
                             f"({' | '.join(self.ORDER)}), got {x.shape[0]} rows")


@dataclass(frozen=True)
class Call:
    """One UNet call, as the editor describes it to its processors and its conv hook."""

    branches: Branches
    inject_attention: bool = False  # PnP q/k injection in the injected self-attentions
    inject_conv: bool = False  # PnP feature injection at the hooked conv
    keyframes: int = 0  # TokenFlow calls: the first `keyframes` frames of each branch are the step's keyframes
    neighbours: Neighbours | None = None  # the call's other frames: each one's keyframes and weights


@dataclass
class KeyframeCache:
    """What the keyframe pass leaves per layer for propagation."""

    source_tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> [K, L, C] (normalised)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> [3, K, L, C]

    def store(self, name: str, hidden: torch.Tensor, out: torch.Tensor, branches: Branches) -> None:
        """Cache layer `name`'s [3K, L, C] input (its source branch) and output."""
        self.source_tokens[name] = normalise(hidden[branches.rows(0)])
        self.outputs[name] = out.view(len(branches.ORDER), branches.n, *out.shape[1:])

    def clear(self) -> None:
        self.source_tokens.clear()
        self.outputs.clear()


@dataclass
class ProcessorContext:
    """Shared by an editor and its processors: the call under way (set by the editor around each UNet
    call, None between calls), the keyframe cache, and the injection counts."""

    call: Call | None = None
    cache: KeyframeCache = field(default_factory=KeyframeCache)
    injections: dict[str, int] = field(default_factory=lambda: {"attention": 0, "conv": 0})

    def current(self, hidden: torch.Tensor) -> Call:
        """The call under way, once `hidden` ([3n, L, C]) is checked against its layout."""
        if self.call is None:
            raise RuntimeError("a TokenFlow processor ran outside a UNet call of its editor")
        if hidden.ndim != 3:
            raise ValueError(f"expected self-attention tokens [3n, L, C], got shape {tuple(hidden.shape)}")
        self.call.branches.check(hidden)
        return self.call

    def branch_count(self) -> int | None:
        """The number of branches of the call under way (each reads one prompt), None between calls."""
        return None if self.call is None else len(self.call.branches.ORDER)

    def count(self, kind: str, injected: bool) -> bool:
        self.injections[kind] += int(injected)
        return injected


def self_attention(attn, hidden: torch.Tensor, branches: Branches, inject: bool, extended: bool,
                   query_slice: int = 0) -> torch.Tensor:
    """[3n, L, C] -> [3n, L, C]. The source branch attends within each frame; with `extended`, each edit
    branch attends to the keys/values of all n frames at once, else within each frame too.
    `inject` gives the edit branches the source branch's queries and keys (PnP). `query_slice`
    (extended only): keyframes per query slice, 0 for all at once."""
    branches.check(hidden)
    n = branches.n
    length = hidden.shape[1]
    q, k, v = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
    if inject:
        q = torch.cat([q[:n]] * 3)
        k = torch.cat([k[:n]] * 3)
    heads = attn.heads
    if not extended:
        out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads),
                                             scale=attn.scale)
        return attn.to_out[1](attn.to_out[0](merge_heads(out)))
    source = F.scaled_dot_product_attention(split_heads(q[:n], heads), split_heads(k[:n], heads),
                                            split_heads(v[:n], heads), scale=attn.scale)
    outputs = [merge_heads(source)]
    step = query_slice if query_slice > 0 else n
    for branch in (1, 2):
        rows = branches.rows(branch)
        # All keyframes' tokens form one key/value sequence shared by every query of the branch.
        keys = split_heads(k[rows].reshape(1, n * length, -1), heads)
        values = split_heads(v[rows].reshape(1, n * length, -1), heads)
        queries = q[rows].reshape(1, n * length, -1)
        pieces = []
        for start in range(0, n, step):
            chunk = queries[:, start * length : (start + step) * length]
            pieces.append(F.scaled_dot_product_attention(split_heads(chunk, heads), keys, values, scale=attn.scale))
        outputs.append(merge_heads(torch.cat(pieces, dim=2)).view(n, length, -1))
    return attn.to_out[1](attn.to_out[0](torch.cat(outputs)))


def normalise(tokens: torch.Tensor) -> torch.Tensor:
    return F.normalize(tokens, dim=-1)


def _match(frames: torch.Tensor, keyframe_tokens: torch.Tensor, slots: torch.Tensor,
           given: torch.Tensor | None = None) -> torch.Tensor:
    """[m, L] index of each frame token's match in its keyframe: the given index where there is one
    (>= 0, e.g. from optical flow), else the most cosine-similar keyframe token (both normalised)."""
    index = torch.bmm(frames, keyframe_tokens[slots].transpose(1, 2)).argmax(dim=-1)
    return index if given is None else torch.where(given >= 0, given.to(index.device), index)


def _given(maps: list[dict[int, torch.Tensor]] | None, length: int) -> torch.Tensor | None:
    """[m, L] given indices for a token grid of `length` (-1: none), or None when no frame has any."""
    rows = [m.get(length) for m in maps] if maps is not None else []
    if all(row is None for row in rows):
        return None
    return torch.stack([torch.full((length,), -1, dtype=torch.long) if row is None else row.long() for row in rows])


def _gather(keyframe_out: torch.Tensor, slots: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[3, m, L, C]: the keyframe outputs at the matched tokens, for every branch."""
    picked = keyframe_out[:, slots]  # [3, m, L, C]
    return torch.gather(picked, 2, index[None, :, :, None].expand(picked.shape[0], -1, -1, picked.shape[-1]))


def propagate(cache: KeyframeCache, name: str, hidden: torch.Tensor, branches: Branches, plan: Neighbours,
              trace: dict | None = None) -> torch.Tensor:
    """[3m, L, C] -> [3m, L, C]: matched, blended keyframe outputs for the m frames of the batch, by the
    keyframes and weights of `plan`. With a `trace` dict, the matched indices [m, L] of keyframe a are
    appended to trace[name]."""
    branches.check(hidden)
    m = branches.n
    keyframe_tokens = cache.source_tokens[name]  # [K, L, C], normalised
    keyframe_out = cache.outputs[name]  # [3, K, L, C]
    frames = normalise(hidden[:m])
    slot_a, slot_b = plan.slot_a.to(hidden.device), plan.slot_b.to(hidden.device)
    length = hidden.shape[1]
    given_a, given_b = _given(plan.given_a, length), _given(plan.given_b, length)
    index_a = _match(frames, keyframe_tokens, slot_a, given_a)
    result = _gather(keyframe_out, slot_a, index_a)
    blend = plan.slot_a != plan.slot_b  # frames between two distinct keyframes
    if blend.any():
        rows = blend.nonzero().squeeze(1).to(hidden.device)
        index_b = _match(frames[rows], keyframe_tokens, slot_b[rows], None if given_b is None else given_b[rows])
        weight = plan.weight_a[blend].to(hidden.device, keyframe_out.dtype).view(1, -1, 1, 1)
        result[:, rows] = weight * result[:, rows] + (1 - weight) * _gather(keyframe_out, slot_b[rows], index_b)
    if trace is not None:
        trace.setdefault(name, []).append(index_a)
    return result.reshape(3 * m, *hidden.shape[1:])


class FrameAttnProcessor:
    """attn1, per frame in every branch: [3n, L, C] -> [3n, L, C]. On an injected layer, the edit
    branches take the source branch's q/k when the call injects attention."""

    def __init__(self, context: ProcessorContext, injected: bool):
        self.context, self.injected = context, injected

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        call = self.context.current(hidden_states)
        inject = self.context.count("attention", self.injected and call.inject_attention)
        return self_attention(attn, hidden_states, call.branches, inject, extended=False)


def frame_rows(hidden: torch.Tensor, branches: Branches, start: int, stop: int) -> torch.Tensor:
    """[3n, L, C] -> [3(stop - start), L, C]: frames [start, stop) of every branch, contiguous as a whole
    call's rows are (on strided rows, MKL's GEMM in the projections rounded differently between two
    runs of one call: a LoRA at scale 0 stopped giving the base model's bytes)."""
    if (start, stop) == (0, branches.n):
        return hidden
    rows = hidden.view(len(branches.ORDER), branches.n, *hidden.shape[1:])[:, start:stop]
    return rows.contiguous().view(-1, *hidden.shape[1:])


def join_frames(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """[3a, L, C] and [3b, L, C] -> [3(a + b), L, C]: every branch's frames of `first`, then of `second`."""
    branches = len(Branches.ORDER)
    return torch.cat([first.view(branches, -1, *first.shape[1:]), second.view(branches, -1, *second.shape[1:])],
                     dim=1).reshape(-1, *first.shape[1:])


class TokenFlowAttnProcessor:
    """attn1 of a TokenFlow call: [3n, L, C] -> [3n, L, C]. The call's first `keyframes` frames per branch
    get extended attention (q/k injection as per frame) and are cached; the other frames get the matched,
    blended keyframe outputs by the call's neighbours. `query_slice`: keyframes per extended-attention
    query slice (0: all at once). With a `trace` dict, records the matches (tests)."""

    def __init__(self, name: str, context: ProcessorContext, injected: bool, query_slice: int = 0,
                 trace: dict | None = None):
        self.name, self.context, self.injected = name, context, injected
        self.query_slice, self.trace = query_slice, trace

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        call = self.context.current(hidden_states)
        k, n = call.keyframes, call.branches.n
        keyframe_out = None
        if k:
            inject = self.context.count("attention", self.injected and call.inject_attention)
            rows = frame_rows(hidden_states, call.branches, 0, k)
            keyframe_out = self_attention(attn, rows, Branches(k), inject, True, self.query_slice)
            self.context.cache.store(self.name, rows, keyframe_out, Branches(k))
            if k == n:
                return keyframe_out
        if call.neighbours is None:
            raise RuntimeError("a propagation call needs its frames' neighbouring keyframes")
        propagated = propagate(self.context.cache, self.name, frame_rows(hidden_states, call.branches, k, n),
                               Branches(n - k), call.neighbours, self.trace)
        return propagated if keyframe_out is None else join_frames(keyframe_out, propagated)


def processor_dicts(unet, layers: UNetLayers, context: ProcessorContext, query_slice: int = 0,
                    trace: dict | None = None) -> dict[str, dict]:
    """One full processor dict per kind of call ("frame", "tokenflow") for `set_attn_processor`:
    that kind's processor on every attn1, the shared-text processor on every cross-attention (each of
    the call's branches reads one prompt), diffusers' AttnProcessor2_0 on any other attention."""
    injected = set(layers.injected_attention)
    makers: dict[str, Callable[[str], object]] = {
        "frame": lambda name: FrameAttnProcessor(context, name in injected),
        "tokenflow": lambda name: TokenFlowAttnProcessor(name, context, name in injected, query_slice, trace),
    }
    mine = set(layers.self_attention)
    others = {name: AttnProcessor2_0() for name in unet.attn_processors if name not in mine}
    others.update(shared_text_processors(unet, context.branch_count))
    return {kind: {**others, **{name: make(name) for name in layers.self_attention}} for kind, make in makers.items()}


def conv_hook(context: ProcessorContext) -> Callable:
    """A forward hook for the PnP conv: during a call that injects conv features, every branch's output
    becomes the source branch's ([3n, C, H, W]); outside the editor's calls, the output is left alone."""

    def hook(module, inputs, output):
        call = context.call
        if call is None or not call.inject_conv:
            return output
        call.branches.check(output)
        context.count("conv", True)
        return torch.cat([output[call.branches.rows(0)]] * 3)

    return hook
