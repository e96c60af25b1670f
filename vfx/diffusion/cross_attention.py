"""Cross-attention for UNet calls whose frames share their text.

Every frame of an inversion call reads one prompt, and every frame of one branch of an edit call
([source | uncond | cond]) reads that branch's prompt. diffusers' processor still projects the same
77 text tokens to keys and values once per frame, and runs attention frame by frame. Here each run
of rows that shares one conditioning becomes a single query sequence against its text's keys and
values, projected once: the same softmax over the same keys for every query, in fewer, larger calls.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

CROSS_ATTENTION = "attn2.processor"  # diffusers' name of every transformer block's text attention


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, C] -> [B, heads, L, C / heads]."""
    batch, length, channels = x.shape
    return x.view(batch, length, heads, channels // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, L, D] -> [B, L, heads * D]."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


def _plain(attn) -> bool:
    """An attention with none of the extras AttnProcessor2_0 applies around it (SD's and SDXL's attn2)."""
    return (attn.spatial_norm is None and attn.group_norm is None and not attn.norm_cross and attn.norm_q is None
            and attn.norm_k is None and not attn.residual_connection and attn.rescale_output_factor == 1.0
            and attn.scale_qk)


class SharedTextAttnProcessor:
    """attn2 for a batch of `runs()` equal-length runs of rows, each run sharing one text conditioning
    (the caller's promise; the first and last row of each run are checked). Any other call (`runs()`
    None, a mask, an attention with norms or residuals) goes to diffusers' AttnProcessor2_0."""

    def __init__(self, runs: Callable[[], int | None]):
        self.runs = runs
        self.fallback = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        runs = self.runs()
        if (runs is None or encoder_hidden_states is None or attention_mask is not None or args or kwargs
                or hidden_states.ndim != 3 or hidden_states.shape[0] % runs or not _plain(attn)):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        batch, length, _ = hidden_states.shape
        per_run = batch // runs
        text = encoder_hidden_states[::per_run]  # one row per run
        if not torch.equal(text, encoder_hidden_states[per_run - 1 :: per_run]):
            raise ValueError(f"the rows of a run of {per_run} do not share one text conditioning")
        query = attn.to_q(hidden_states).reshape(runs, per_run * length, -1)
        key, value = attn.to_k(text), attn.to_v(text)
        heads = attn.heads
        out = F.scaled_dot_product_attention(split_heads(query, heads), split_heads(key, heads),
                                             split_heads(value, heads))
        out = merge_heads(out).reshape(batch, length, -1).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def shared_text_processors(unet, runs: Callable[[], int | None]) -> dict[str, SharedTextAttnProcessor]:
    """A SharedTextAttnProcessor for every cross-attention of `unet`, by processor name."""
    return {name: SharedTextAttnProcessor(runs) for name in unet.attn_processors if name.endswith(CROSS_ATTENTION)}


@contextmanager
def one_text_per_call(unet) -> Iterator[None]:
    """For the duration, every call of `unet` is taken to read one text conditioning in all its rows
    (an inversion's calls); the processors it had are put back at the end."""
    previous = dict(unet.attn_processors)
    unet.set_attn_processor({**previous, **shared_text_processors(unet, lambda: 1)})
    try:
        yield
    finally:
        unet.set_attn_processor(previous)
