"""Stable Diffusion 1.x/2.x and SDXL weights renamed from diffusers' layout to the original (LDM/CompVis)
one: the single-file `.safetensors` layout that A1111, ComfyUI, kohya and `from_single_file` read.

diffusers ships only the opposite direction in its library (its loaders read LDM files), so this map
is written by hand from the two layouts' module structure; `vfx export --format checkpoint` is
tested by loading its output back with diffusers' `from_single_file`.
"""

from __future__ import annotations

import torch

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def unet_prefixes(config: dict) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) of every UNet block, from the UNet's config."""
    n = int(config["layers_per_block"])
    blocks = len(config["block_out_channels"])
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.attentions.0.", "middle_block.1.")]
    pairs += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    if config.get("addition_embed_type") == "text_time":  # SDXL's pooled-text-and-size embedding
        pairs += [("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")]
    for i, kind in enumerate(config["down_block_types"]):
        for j in range(n):
            row = 1 + i * (n + 1) + j
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{row}.0."))
            if kind.startswith("CrossAttn"):
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{row}.1."))
        if i < blocks - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (n + 1)}.0.op."))
    for i, kind in enumerate(config["up_block_types"]):
        attention = kind.startswith("CrossAttn")
        for j in range(n + 1):
            row = i * (n + 1) + j
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{row}.0."))
            if attention:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{row}.1."))
        if i < blocks - 1:
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (n + 1) + n}.{2 if attention else 1}."))
    return pairs


def rename(key: str, prefixes: list[tuple[str, str]], inner: list[tuple[str, str]]) -> str:
    for old, new in prefixes:
        if key.startswith(old):
            rest = key[len(old):]
            for a, b in inner:
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
                    break
            return new + rest
    return key


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    prefixes = unet_prefixes(config)
    # Only resnets rename their layers; transformer blocks keep diffusers' names in both layouts.
    return {"model.diffusion_model." + rename(key, prefixes, RESNET if ".resnets." in key else []): value
            for key, value in state.items()}


def vae_prefixes(config: dict) -> list[tuple[str, str]]:
    blocks = len(config["block_out_channels"])
    layers = int(config["layers_per_block"])
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        pairs.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
        pairs += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.") for j in range(2)]
    for i in range(blocks):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(layers)]
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        up = blocks - 1 - i  # the LDM decoder numbers its levels from the lowest resolution up
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.") for j in range(layers + 1)]
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample."))
    return pairs


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    prefixes = vae_prefixes(config)
    out = {}
    for key, value in state.items():
        new = rename(key, prefixes, VAE_RESNET + VAE_ATTENTION)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the LDM VAE's attention projections are 1x1 convolutions
        out["first_stage_model." + new] = value
    return out


CLIP = "cond_stage_model.transformer."
SDXL_CLIP, SDXL_OPEN_CLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."


def text_encoder_to_ldm(state: dict[str, torch.Tensor], prefix: str = CLIP) -> dict[str, torch.Tensor]:
    """A CLIP text encoder (SD 1.x's; SDXL's first under SDXL_CLIP): the transformers 4.x names under `prefix`."""
    from vfx.portable import text_encoder_keys

    renamed = text_encoder_keys(state)
    return {prefix + renamed[k]: v for k, v in state.items()}


OPEN_CLIP = "cond_stage_model.model."


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str = OPEN_CLIP) -> dict[str, torch.Tensor]:
    """An OpenCLIP text encoder in its original layout (SD 2.x's under `cond_stage_model.model.`, SDXL's
    second under SDXL_OPEN_CLIP), by diffusers' own OpenCLIP name table read backwards; q/k/v join into
    one `in_proj` as OpenCLIP stores them, and the projection is OpenCLIP's [width, dim] matrix, the
    transpose of the linear layer's weight."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    from vfx.portable import text_encoder_keys

    table = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    renamed = text_encoder_keys(state)
    state = {renamed[k]: v for k, v in state.items()}
    out = {prefix + ldm: state[key].T if ldm == "text_projection" else state[key]
           for key, ldm in table["layers"].items() if key in state}
    joined: dict[str, list] = {}
    for key, value in state.items():
        if not key.startswith("text_model.encoder.layers."):
            continue
        for new, old in table["transformer"].items():
            key = key.replace(new, old)
        block, _, kind = key.rpartition(".")  # kind: weight | bias
        if block.endswith((".q_proj", ".k_proj", ".v_proj")):
            joined.setdefault(f"{block[:-7]}.in_proj_{kind}", [None] * 3)["qkv".index(block[-6])] = value
        else:
            out[prefix + "transformer." + key] = value
    out.update({prefix + "transformer." + k: torch.cat(parts) for k, parts in joined.items()})
    return out
