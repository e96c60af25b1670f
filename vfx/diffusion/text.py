"""Prompt embeddings, with an explicit rule for prompts longer than the tokenizer allows."""

from __future__ import annotations

import torch

from vfx import log


def token_count(tokenizer, prompt: str) -> int:
    """Tokens of `prompt` including the start and end tokens."""
    return len(tokenizer(prompt, truncation=False).input_ids)


@torch.no_grad()
def encode_prompt(pipe, prompt: str) -> torch.Tensor:
    """[1, 77, d] text embedding. Prompts over the limit are truncated, with a warning naming the limit."""
    tokenizer = pipe.tokenizer
    limit = tokenizer.model_max_length
    count = token_count(tokenizer, prompt)
    if count > limit:
        log.warn(f"prompt has {count} tokens; the text encoder reads {limit}, so it is truncated: {prompt[:60]!r}…")
    ids = tokenizer(prompt, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids
    encoder = pipe.text_encoder
    return encoder(ids.to(encoder.device))[0]
