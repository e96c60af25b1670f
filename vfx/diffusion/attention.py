"""TokenFlow's attention processors and the PnP feature hook, on diffusers' public APIs.

Every self-attention (`attn1` of each transformer block) gets a `TokenFlowProcessor`; they share
one `TokenFlowState`, which the edit loop switches between passes:

- "keyframe": extended attention. The batch is [source | uncond | cond] x K keyframes; the source
  branch attends within its own frame, each edit branch attends to the keys/values of all K
  keyframes at once (one shared K/V sequence through SDPA, no K-fold repetition). The source
  branch's input tokens and every branch's outputs are cached per layer.
- "propagate": no attention. Each frame's tokens are matched (cosine similarity of the source
  branch's input tokens, argmax) to its neighbouring keyframes' tokens, and the output is the
  matched keyframe outputs blended by the frame's weights. Correspondences given from outside
  (optical flow) take the place of the matching wherever they are defined.
- "plain": per-frame attention in every branch (the naive per-frame PnP baseline).

Plug-and-play injection replaces the edit branches' queries and keys by the source branch's in the
decoder's self-attentions, and the output of `conv2` of one decoder resnet by the source branch's
(a forward hook, before the residual sum).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0


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
    """SD's reference choice, located structurally: the decoder's cross-attention up blocks after the
    first; in the first of them, every transformer but the first gets q/k injection and resnet 1's conv2
    gets feature injection (up_blocks 1-3 and up_blocks[1].resnets[1] in SD 1.x/2.x)."""
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
                         for k in range(len(attention.transformer_blocks))][:1]
    resnet = 1 if len(unet.up_blocks[first].resnets) > 1 else 0
    return UNetLayers(self_attention, injected, f"up_blocks.{first}.resnets.{resnet}.conv2")


@dataclass
class TokenFlowState:
    """What the processors need to know about the current pass, and what they cache."""

    mode: str = "plain"  # plain | keyframe | propagate
    inject_attention: bool = False
    inject_conv: bool = False
    query_slice: int = 0  # keyframes per extended-attention query slice (0: all at once)
    neighbours: Neighbours | None = None
    source_tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> [K, L, C] (normalised)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> [3, K, L, C]
    attention_injections: int = 0
    conv_injections: int = 0
    trace: dict | None = None  # when a dict, propagation records its matched indices per layer (tests)

    def clear(self) -> None:
        self.source_tokens.clear()
        self.outputs.clear()


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, channels = x.shape
    return x.view(batch, length, heads, channels // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


def self_attention(attn, hidden: torch.Tensor, inject: bool, extended: bool, query_slice: int = 0) -> torch.Tensor:
    """[3n, L, C] -> [3n, L, C]. The source branch attends within each frame; with `extended`, each edit
    branch attends to the keys/values of all n frames at once, else within each frame too.
    `inject` gives the edit branches the source branch's queries and keys (PnP)."""
    n = hidden.shape[0] // 3
    length = hidden.shape[1]
    q, k, v = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
    if inject:
        q = torch.cat([q[:n]] * 3)
        k = torch.cat([k[:n]] * 3)
    heads = attn.heads
    if not extended:
        out = F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads), scale=attn.scale)
        return attn.to_out[1](attn.to_out[0](_merge(out)))
    source = F.scaled_dot_product_attention(_heads(q[:n], heads), _heads(k[:n], heads), _heads(v[:n], heads),
                                            scale=attn.scale)
    outputs = [_merge(source)]
    step = query_slice if query_slice > 0 else n
    for branch in (1, 2):
        rows = slice(branch * n, (branch + 1) * n)
        # All keyframes' tokens form one key/value sequence shared by every query of the branch.
        keys = _heads(k[rows].reshape(1, n * length, -1), heads)
        values = _heads(v[rows].reshape(1, n * length, -1), heads)
        queries = q[rows].reshape(1, n * length, -1)
        pieces = []
        for start in range(0, n, step):
            chunk = queries[:, start * length : (start + step) * length]
            pieces.append(F.scaled_dot_product_attention(_heads(chunk, heads), keys, values, scale=attn.scale))
        outputs.append(_merge(torch.cat(pieces, dim=2)).view(n, length, -1))
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


def propagate(state: TokenFlowState, name: str, hidden: torch.Tensor) -> torch.Tensor:
    """[3m, L, C] -> matched, blended keyframe outputs for the m frames of the batch."""
    m = hidden.shape[0] // 3
    plan = state.neighbours
    keyframe_tokens = state.source_tokens[name]  # [K, L, C], normalised
    keyframe_out = state.outputs[name]  # [3, K, L, C]
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
    if state.trace is not None:
        state.trace.setdefault(name, []).append(index_a)
    return result.reshape(3 * m, *hidden.shape[1:])


class TokenFlowProcessor:
    """Self-attention processor for one layer; behaviour set by the shared state's mode."""

    def __init__(self, name: str, state: TokenFlowState, injected: bool):
        self.name, self.state, self.injected = name, state, injected
        self.plain = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        state = self.state
        if hidden_states.ndim != 3 or hidden_states.shape[0] % 3:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        inject = self.injected and state.inject_attention
        if state.mode in {"plain", "keyframe"}:
            state.attention_injections += int(inject)
            out = self_attention(attn, hidden_states, inject, state.mode == "keyframe", state.query_slice)
            if state.mode == "keyframe":
                n = hidden_states.shape[0] // 3
                state.source_tokens[self.name] = normalise(hidden_states[:n])
                state.outputs[self.name] = out.view(3, n, *out.shape[1:])
            return out
        return propagate(state, self.name, hidden_states)


def install(unet, state: TokenFlowState) -> tuple:
    """Swap in TokenFlow processors on every attn1 and hook the PnP conv; `uninstall` undoes both."""
    layers = find_layers(unet)
    previous = dict(unet.attn_processors)
    injected = set(layers.injected_attention)
    processors = {}
    for name, processor in unet.attn_processors.items():
        if name in layers.self_attention:
            processors[name] = TokenFlowProcessor(name, state, name in injected)
        else:
            processors[name] = AttnProcessor2_0()
    unet.set_attn_processor(processors)

    def inject_conv(module, inputs, output):
        if not state.inject_conv or output.shape[0] % 3:
            return output
        state.conv_injections += 1
        n = output.shape[0] // 3
        return torch.cat([output[:n]] * 3)

    conv = unet.get_submodule(layers.injected_conv)
    return conv.register_forward_hook(inject_conv), previous


def uninstall(unet, installed) -> None:
    handle, previous = installed
    handle.remove()
    unet.set_attn_processor(previous)
