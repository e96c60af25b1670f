"""Prompt conditioning for the UNet, with an explicit rule for prompts longer than the tokenizer allows.

SD 1.x/2.x condition on one text encoder's last hidden states. SDXL conditions on two: the
penultimate hidden states of both, concatenated along the channels, plus the second encoder's pooled
projection and six micro-conditioning numbers (original size, crop top-left, target size), which
reach the UNet through `added_cond_kwargs`. `Conditioning` holds either, batched along dim 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vfx import log


@dataclass
class Conditioning:
    """What the UNet is conditioned on, for a batch of rows: `hidden` [B, 77, d]; SDXL adds `pooled`
    [B, p] (text_embeds) and `time_ids` [B, 6] (original h, w, crop top, left, target h, w)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def repeat(self, rows: int) -> "Conditioning":
        """This (one-row) conditioning for `rows` rows (views, no copies)."""
        def grow(t):
            return None if t is None else t.expand(rows, *t.shape[1:])

        return Conditioning(grow(self.hidden), grow(self.pooled), grow(self.time_ids))

    def rows(self, index: slice) -> "Conditioning":
        def pick(t):
            return None if t is None else t[index]

        return Conditioning(pick(self.hidden), pick(self.pooled), pick(self.time_ids))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        def join(name):
            tensors = [getattr(part, name) for part in parts]
            return None if tensors[0] is None else torch.cat(tensors)

        return Conditioning(join("hidden"), join("pooled"), join("time_ids"))

    def unet_kwargs(self) -> dict:
        """Keyword arguments of a UNet2DConditionModel (or ControlNetModel) call."""
        if self.pooled is None:
            return {"encoder_hidden_states": self.hidden}
        return {"encoder_hidden_states": self.hidden,
                "added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": self.time_ids}}


def is_sdxl(pipe) -> bool:
    """SDXL is told by its UNet's config (text and time micro-conditioning), never by a model's name."""
    return is_sdxl_unet(pipe.unet)


def is_sdxl_unet(unet) -> bool:
    from vfx.models import family_of_unet

    return family_of_unet(unet.config) == "sdxl"


def token_count(tokenizer, prompt: str) -> int:
    """Tokens of `prompt` including the start and end tokens."""
    return len(tokenizer(prompt, truncation=False).input_ids)


def _token_ids(tokenizer, prompt: str, warn: bool = True) -> torch.Tensor:
    """[1, 77] ids of `prompt`. Prompts over the limit are truncated, with a warning naming the limit."""
    limit = tokenizer.model_max_length
    count = token_count(tokenizer, prompt)
    if count > limit and warn:
        log.warn(f"prompt has {count} tokens; the text encoder reads {limit}, so it is truncated: {prompt[:60]!r}…")
    return tokenizer(prompt, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids


def micro_conditioning(size: tuple[int, int], dtype=torch.float32, device=None) -> torch.Tensor:
    """SDXL's time ids for frames of pixel `size` (h, w), uncropped: [1, 6]."""
    h, w = size
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=device)


def native_pixel_size(pipe) -> tuple[int, int]:
    side = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    return side, side


def text_encoder_names(pipe) -> list[str]:
    """The pipeline's text encoder attributes, in order: text_encoder (and SDXL's text_encoder_2)."""
    return ["text_encoder", "text_encoder_2"] if is_sdxl(pipe) else ["text_encoder"]


def text_encoders(pipe) -> list:
    return [getattr(pipe, name) for name in text_encoder_names(pipe)]


def tokenizers(pipe) -> list:
    return [getattr(pipe, name.replace("text_encoder", "tokenizer")) for name in text_encoder_names(pipe)]


def encode_tokens(encoders: list, ids: list[torch.Tensor]) -> Conditioning:
    """Conditioning (no time ids) of token ids [B, 77], one tensor per encoder. One encoder: its last
    hidden states (SD 1.x/2.x). Two (SDXL): both encoders' penultimate hidden states, concatenated, and
    the second's projected pooled output."""
    if len(encoders) == 1:
        return Conditioning(encoders[0](ids[0].to(encoders[0].device))[0])
    hidden, pooled = [], None
    for encoder, tokens in zip(encoders, ids):
        out = encoder(tokens.to(encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the second encoder's text_embeds
    return Conditioning(torch.cat(hidden, dim=-1), pooled)


@torch.no_grad()
def encode_prompt(pipe, prompt: str, size: tuple[int, int] | None = None, negative: bool = False) -> Conditioning:
    """One row of conditioning for `prompt`. `size` is the pixel size (h, w) of the frames (SDXL's micro-
    conditioning; default: the model's native size). With `negative`, an empty prompt gives zeros where
    the SDXL pipeline's `force_zeros_for_empty_prompt` says so: its guidance without a negative prompt."""
    encoded = encode_tokens(text_encoders(pipe), [_token_ids(t, prompt, warn=k == 0)  # one warning for both
                                                  for k, t in enumerate(tokenizers(pipe))])
    if not is_sdxl(pipe):
        return encoded
    hidden, pooled, dtype = encoded.hidden, encoded.pooled, pipe.unet.dtype
    if negative and not prompt and pipe.config.get("force_zeros_for_empty_prompt", False):
        hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
    time_ids = micro_conditioning(size or native_pixel_size(pipe), dtype=dtype, device=hidden.device)
    return Conditioning(hidden.to(dtype), pooled.to(dtype), time_ids)
