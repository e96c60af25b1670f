"""Checkpoint size and training memory of `vfx train` on Stable Diffusion 1.5, computed from parameter counts.

The UNet, text encoder and VAE are built from SD 1.5's configs on the meta device (no weights, no
download), so every count is exact. Bytes per parameter: fp32 weights 4, gradients 4 (trained parameters
only), AdamW 8 (two fp32 moments); bitsandbytes' AdamW8bit keeps two uint8 moments (2) plus two fp32
block scales per 256 elements, but fp32 moments (8) for tensors under 4096 elements. Activations,
the CUDA context and allocator slack are not counted: they depend on resolution, batch size and
--gradient-checkpointing.

    python bench/sd15_memory.py [--rank 4]
"""

from __future__ import annotations

import argparse

import torch

UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
MIN_8BIT, BLOCK = 4096, 256  # bitsandbytes' defaults


def sd15_models():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**UNET)
        vae = AutoencoderKL(**VAE)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            projection_dim=768, hidden_act="quick_gelu"))
    return unet, text, vae


def lora_shapes(unet, rank: int) -> list[int]:
    """Element counts of the LoRA tensors (A: rank x in, B: out x rank) on the UNet's attention projections."""
    sizes = []
    for name, module in unet.named_modules():
        if name.endswith(UNET_LORA_TARGETS) and isinstance(module, torch.nn.Linear):
            sizes += [rank * module.in_features, module.out_features * rank]
    return sizes


def adam8bit_bytes(sizes: list[int]) -> float:
    return sum(8 * n if n < MIN_8BIT else 2 * n + 8 * -(-n // BLOCK) for n in sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    args = parser.parse_args()
    unet, text, vae = sd15_models()
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    n_unet, n_text, n_vae = count(unet), count(text), count(vae)
    print(f"UNet {n_unet:,}  text encoder {n_text:,}  VAE {n_vae:,}")
    frozen_base = 4 * (n_unet + n_text + n_vae)
    full = [p.numel() for p in unet.parameters()]
    lora = lora_shapes(unet, args.rank)
    print(f"LoRA rank {args.rank} on {', '.join(UNET_LORA_TARGETS)}: {sum(lora):,} parameters in {len(lora)} tensors, "
          f"{sum(n for n in lora if n >= MIN_8BIT):,} of them in tensors of >= {MIN_8BIT} elements")
    half_base = 2 * n_unet + 4 * (n_text + n_vae)  # LoRA with --mixed-precision fp16/bf16: the frozen UNet in 2 bytes
    print("| mode | optimizer | trained params | checkpoint | weights | gradients | optimizer state | total, no activations |")
    print("|---|---|---|---|---|---|---|---|")
    rows = (("full", full, frozen_base), ("lora", lora, frozen_base + 4 * sum(lora)),
            ("lora, bf16/fp16 base", lora, half_base + 4 * sum(lora)))
    for mode, sizes, weights in rows:
        trained = sum(sizes)
        for optimizer, state in (("adamw", 8 * trained), ("adamw8bit", adam8bit_bytes(sizes))):
            print(f"| {mode} | {optimizer} | {trained / 1e6:.2f} M | {size(4 * trained + state)} | {size(weights)} | "
                  f"{size(4 * trained)} | {size(state)} | {size(weights + 4 * trained + state)} |")


def size(count: float) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"


if __name__ == "__main__":
    main()
