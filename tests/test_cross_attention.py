"""Cross-attention shared by the frames of one prompt."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from conftest import tiny_pipe
from vfx.diffusion.cross_attention import SharedTextAttnProcessor, one_text_per_call, shared_text_processors

FRAMES = 4  # per run


def _texts(unet, runs: int) -> torch.Tensor:
    """`runs` different text conditionings, each repeated for FRAMES rows: [runs * FRAMES, 77, C]."""
    generator = torch.Generator().manual_seed(3)
    texts = torch.randn(runs, 77, unet.config.cross_attention_dim, generator=generator)
    return texts.repeat_interleave(FRAMES, dim=0)


def _unet_call(unet, processors: dict, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    unet.set_attn_processor(processors)
    with torch.no_grad():
        return unet(x, 401, encoder_hidden_states=text).sample


@pytest.mark.parametrize("runs", [1, 3])
def test_shared_text_gives_what_per_frame_cross_attention_gives(runs):
    """The UNet's output with every cross-attention shared per run equals diffusers' per-frame one, and
    the text is projected once per run, not once per frame."""
    unet = tiny_pipe().unet
    x = torch.randn(runs * FRAMES, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = _texts(unet, runs)
    plain = _unet_call(unet, {name: AttnProcessor2_0() for name in unet.attn_processors}, x, text)
    projected = []
    to_k = next(m for name, m in unet.named_modules() if name.endswith("attn2")).to_k
    hook = to_k.register_forward_hook(lambda module, inputs, output: projected.append(inputs[0].shape[0]))
    shared = _unet_call(unet, {**unet.attn_processors, **shared_text_processors(unet, lambda: runs)}, x, text)
    hook.remove()
    assert projected == [runs]
    # The same sums in another grouping: float32 round-off of outputs of this scale (measured: 1e-6 of it).
    assert float((shared - plain).abs().max()) <= 1e-5 * float(plain.abs().max())


def test_rows_that_do_not_share_their_text_are_refused():
    unet = tiny_pipe().unet
    attn = next(m for n, m in unet.named_modules() if n.endswith("attn2"))
    tokens = torch.randn(2 * FRAMES, 64, attn.to_q.in_features)
    text = _texts(unet, 2)
    with pytest.raises(ValueError, match="do not share one text"):
        SharedTextAttnProcessor(lambda: 1)(attn, tokens, text)  # two texts described as one run


def test_calls_it_was_not_told_about_go_to_diffusers_processor():
    unet = tiny_pipe().unet
    attn = next(m for n, m in unet.named_modules() if n.endswith("attn2"))
    tokens = torch.randn(FRAMES, 64, attn.to_q.in_features)
    text = _texts(unet, 1)
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, tokens, text)
        assert torch.equal(SharedTextAttnProcessor(lambda: None)(attn, tokens, text), expected)
        mask = torch.ones(FRAMES, 77, dtype=torch.bool)
        masked = AttnProcessor2_0()(attn, tokens, text, attention_mask=mask)
        assert torch.equal(SharedTextAttnProcessor(lambda: 1)(attn, tokens, text, attention_mask=mask), masked)


def test_one_text_per_call_puts_the_processors_back():
    unet = tiny_pipe().unet
    before = dict(unet.attn_processors)
    with one_text_per_call(unet):
        during = unet.attn_processors
        assert all(isinstance(p, SharedTextAttnProcessor) for n, p in during.items() if n.endswith("attn2.processor"))
        assert all(during[n] is before[n] for n in during if n.endswith("attn1.processor"))
    assert dict(unet.attn_processors) == before
