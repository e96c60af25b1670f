"""The embedded tiny models, built locally in seconds from fixed seeds (the same bytes every time).

`tiny` is SD 1.x-shaped (epsilon prediction, 4 heads, conv projections); `tiny-v` is SD 2.x-shaped
(v-prediction, linear projections, per-block head counts); `tiny-xl` is SDXL-shaped (two text encoders,
micro-conditioning, SDXL's block layout and VAE scaling); `tiny-depth` is shaped like
`stable-diffusion-2-depth` (a 5-channel UNet reading latents and a depth map, with a tiny DPT depth
estimator of its own). They exercise the code paths of the real checkpoints at toy cost; vfx.models
caches them (`tiny_model_dir`).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

from vfx import models

TINY_VAE_ASSET = Path(__file__).parent / "assets" / "tiny_vae.safetensors"
SDXL_SCALING_FACTOR = 0.13025


def build_tiny(folder: Path, variant: str = "tiny") -> Path:
    """Build the tiny pipeline into `folder` (deterministic: the same bytes every time)."""
    from diffusers import ControlNetModel

    from vfx.portable import portable_pipeline

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards" would land in a command's output
    folder = Path(folder)
    builders = {"tiny": lambda: tiny_sd_pipeline(False), "tiny-v": lambda: tiny_sd_pipeline(True),
                "tiny-xl": tiny_xl_pipeline, "tiny-depth": tiny_depth_pipeline}
    pipe = builders[variant]()
    pipe.save_pretrained(folder)
    portable_pipeline(folder)
    torch.manual_seed(3)
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
    wake_zero_convolutions(controlnet)
    controlnet.save_pretrained(folder / "controlnet")
    (folder / "VFX_TINY_MODEL").write_text(f"{variant} {models.TINY_VERSION}\n")
    return folder


def tiny_tokenizer(pad_token: str):
    """A CLIPTokenizer over the local BPE vocabulary (vfx/tokenizer.py), CLIP's 77-token limit."""
    from transformers import CLIPTokenizer

    from vfx.tokenizer import write_tokenizer_files

    with tempfile.TemporaryDirectory() as scratch:
        write_tokenizer_files(Path(scratch))
        return CLIPTokenizer(str(Path(scratch) / "vocab.json"), str(Path(scratch) / "merges.txt"),
                             pad_token=pad_token, model_max_length=77)


def tiny_text_encoder(tokenizer, seed: int, activation: str, projection: bool = False, width: int = 32):
    """A 2-layer CLIP text encoder (`projection`: with the projected pooled output, as SDXL's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=activation,
        projection_dim=width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_ddim_scheduler(prediction_type: str):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def tiny_sd_pipeline(sd2: bool):
    """SD 1.x-shaped (epsilon, quick-GELU CLIP) or, with `sd2`, SD 2.x-shaped (v-prediction, OpenCLIP-like)."""
    from diffusers import StableDiffusionPipeline

    tokenizer = tiny_tokenizer("!" if sd2 else "<|endoftext|>")
    text_encoder = tiny_text_encoder(tokenizer, 0, "gelu" if sd2 else "quick_gelu")
    torch.manual_seed(1)
    unet = tiny_unet(sd2)
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=tiny_ddim_scheduler("v_prediction" if sd2 else "epsilon"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_depth_pipeline():
    """Shaped like stable-diffusion-2-depth: SD 2.x's text encoder and UNet layout, epsilon prediction,
    a UNet reading 5 channels (the latents and the depth map), and a DPT depth estimator with its image
    processor (a plain ViT DPT at toy width: the real one is DPT-Hybrid, whose backbone is a ResNet)."""
    from diffusers import StableDiffusionDepth2ImgPipeline
    from transformers import DPTConfig, DPTForDepthEstimation

    tokenizer = tiny_tokenizer("!")
    text_encoder = tiny_text_encoder(tokenizer, 0, "gelu")
    torch.manual_seed(1)
    unet = tiny_unet(True, in_channels=5)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
                       patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                       fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5], head_in_index=-1,
                       initializer_range=0.2)  # wide enough that the random head's output is not ~0
    torch.manual_seed(4)
    depth_estimator = DPTForDepthEstimation(config).eval()
    return StableDiffusionDepth2ImgPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=tiny_ddim_scheduler("epsilon"),
        depth_estimator=depth_estimator,
        feature_extractor=dpt_image_processor(32),
    )


def dpt_image_processor_class():
    """DPT's image processor: the PIL backend where transformers has one (its default needs torchvision)."""
    import transformers

    return getattr(transformers, "DPTImageProcessorPil", None) or transformers.DPTImageProcessor


def dpt_image_processor(side: int):
    return dpt_image_processor_class()(size={"height": side, "width": side}, keep_aspect_ratio=False)


def tiny_xl_pipeline():
    """SDXL-shaped: two CLIP text encoders (the second with projection; SDXL pads it with "!"), the
    text-and-time micro-conditioned UNet, SDXL's VAE scaling, its Euler scheduler config."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = tiny_tokenizer("<|endoftext|>"), tiny_tokenizer("!")
    text_encoder = tiny_text_encoder(tokenizer, 0, "quick_gelu")
    # Wider than the first, as SDXL's (1280 against 768): single-file loaders tell the two apart by width.
    text_encoder_2 = tiny_text_encoder(tokenizer_2, 2, "gelu", projection=True, width=48)
    torch.manual_seed(1)
    unet = tiny_xl_unet(cross_attention_dim=32 + 48, pooled_dim=48)
    config = json.loads((Path(__file__).parent / "configs" / "sdxl" / "scheduler" / "scheduler_config.json").read_text())
    return StableDiffusionXLPipeline(
        vae=tiny_vae(SDXL_SCALING_FACTOR),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(config),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def tiny_unet(sd2: bool, in_channels: int = 4):
    """SD's UNet block structure at toy width: 3 cross-attention down blocks + 1 plain, mirrored up."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 8, 8) if sd2 else 4,
        use_linear_projection=sd2,
        norm_num_groups=16,
    )


def tiny_xl_unet(cross_attention_dim: int, pooled_dim: int, time_embed_dim: int = 8):
    """SDXL's UNet layout at toy width: 3 levels, no attention at the first, more transformer layers
    deeper in (SDXL: 0 / 2 / 10), linear projections, and the pooled text + six time ids added to the
    timestep embedding (`text_time`)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_embed_dim,
        norm_num_groups=16,
    )


def bare_tiny_vae():
    """SD's VAE shape (downsampling factor 8, 4 latent channels) at toy width, untrained."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def tiny_vae(scaling_factor: float | None = None):
    """The tiny VAE with its shipped trained weights and their unit-variance latent scaling factor.

    The weights are float16 to keep the repository small; the model is float32 like the rest. With
    `scaling_factor`, the latent space is rescaled (the encoder's output convolution times k, the
    decoder's input convolution divided by k: the same images) so that this factor still gives unit
    variance, as SDXL's 0.13025 does for its VAE.
    """
    from safetensors import safe_open

    vae = bare_tiny_vae()
    with safe_open(str(TINY_VAE_ASSET), framework="pt") as weights:
        state = {name: weights.get_tensor(name).float() for name in weights.keys()}
        trained = float(weights.metadata()["scaling_factor"])
    if scaling_factor is not None:
        k = trained / scaling_factor
        channels = vae.config.latent_channels
        state["quant_conv.weight"][:channels] *= k  # the posterior mean
        state["quant_conv.bias"][:channels] *= k
        state["quant_conv.bias"][channels:] += 2 * math.log(k)  # its log-variance
        state["post_quant_conv.weight"] /= k
    vae.load_state_dict(state, strict=True)
    vae.register_to_config(scaling_factor=scaling_factor or trained)  # force_upcast stays True, as SDXL's
    return vae


def wake_zero_convolutions(controlnet) -> None:
    """Give the ControlNet's zero-initialised output convolutions small random weights.

    A fresh ControlNet adds exactly zero to the UNet until it is trained; the tiny one stands in for
    a trained one, so its conditioning must reach the UNet.
    """
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            torch.nn.init.normal_(conv.weight, std=0.05)
