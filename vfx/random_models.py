"""Randomly initialised pipelines with the real architectures of SD 1.5, SD 2.1 and SDXL base.

For measuring speed and memory at real size where the weights cannot be downloaded: the configs in
vfx/configs/ARCH/ are the public model cards' config.json values, the weights come from fixed seeds
(the same bytes on every build), and nothing is downloaded. The real CLIP vocabulary cannot be
downloaded either, so the tokenizers are the tiny model's local BPE vocabulary (vfx/tokenizer.py)
padded to CLIP's 49408 entries, with the special tokens at CLIP's ids (49406, 49407).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from vfx.errors import BadInput

CONFIGS = Path(__file__).resolve().parent / "configs"
# arch -> (the Hub model whose configs are shipped, what vfx does with it)
ARCHS = {
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "512 px, epsilon prediction"),
    "sd21": ("stabilityai/stable-diffusion-2-1", "768 px, v-prediction"),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "1024 px, two text encoders"),
}
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
CLIP_VOCAB = 49408
MARKER = "VFX_RANDOM_MODEL.json"


def load_configs(arch: str) -> dict[str, dict]:
    """The shipped configs of `arch`: {"unet/config.json": {...}, "tokenizer/tokenizer_config.json": {...}, ...}."""
    if arch not in ARCHS:
        raise BadInput(f"unknown --arch {arch!r}: use {', '.join(ARCHS)}")
    root = CONFIGS / arch
    return {path.relative_to(root).as_posix(): json.loads(path.read_text()) for path in sorted(root.rglob("*.json"))}


def components(configs: dict[str, dict]) -> set[str]:
    return {name.split("/")[0] for name in configs}


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- components


def build_unet(config: dict):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(config)


def build_vae(config: dict):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(config)


def build_text_encoder(config: dict):
    import transformers
    from transformers import CLIPTextConfig

    architecture = config["architectures"][0]  # CLIPTextModel, or CLIPTextModelWithProjection (SDXL's second)
    return getattr(transformers, architecture)(CLIPTextConfig.from_dict(config))


def build_scheduler(config: dict):
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config(config)


def padded_vocab(size: int = CLIP_VOCAB) -> tuple[dict[str, int], list[str]]:
    """The tiny model's BPE vocabulary padded with unused tokens to `size`, special tokens last (CLIP's ids)."""
    from vfx.tokenizer import SPECIALS, build_vocab

    vocab, merges = build_vocab()
    tokens = [token for token in vocab if token not in SPECIALS]
    tokens += [f"<|unused-{index}|>" for index in range(size - len(tokens) - len(SPECIALS))]
    return {token: index for index, token in enumerate(tokens + list(SPECIALS))}, merges


def build_tokenizer(tokenizer_config: dict, special_tokens: dict):
    from transformers import CLIPTokenizer

    tokens = {**{k: tokenizer_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}, **special_tokens}
    vocab, merges = padded_vocab()
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (Path(scratch) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(Path(scratch) / "vocab.json"), str(Path(scratch) / "merges.txt"),
                             model_max_length=tokenizer_config["model_max_length"], **tokens)


# ---------------------------------------------------------------- the pipeline


def build_pipeline(configs: dict[str, dict], dtype: torch.dtype):
    """The pipeline the configs describe, each component initialised from its own fixed seed and cast to
    `dtype` right away (so that at most one component is held in fp32)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    def seeded(seed: int, build, config: dict):
        torch.manual_seed(seed)
        return build(config).to(dtype)

    def tokenizer(name: str):
        return build_tokenizer(configs[f"{name}/tokenizer_config.json"], configs.get(f"{name}/special_tokens_map.json", {}))

    parts = dict(
        unet=seeded(1, build_unet, configs["unet/config.json"]),
        vae=seeded(2, build_vae, configs["vae/config.json"]),
        text_encoder=seeded(0, build_text_encoder, configs["text_encoder/config.json"]),
        tokenizer=tokenizer("tokenizer"),
        scheduler=build_scheduler(configs["scheduler/scheduler_config.json"]),
    )
    if "text_encoder_2" in components(configs):
        return StableDiffusionXLPipeline(
            text_encoder_2=seeded(3, build_text_encoder, configs["text_encoder_2/config.json"]),
            tokenizer_2=tokenizer("tokenizer_2"), force_zeros_for_empty_prompt=True, add_watermarker=False, **parts,
        )
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def check_target(out: Path, force: bool) -> Path:
    """`out` if a model may be written there: new, or (with --force) an empty folder or a model folder."""
    out = Path(out)
    if out.is_symlink():
        raise BadInput(f"{out} is a symbolic link; give a real folder path")
    if out.exists():
        if not out.is_dir():
            raise BadInput(f"{out} exists and is not a folder")
        if not force and any(out.iterdir()):
            raise BadInput(f"{out} exists; pass --force to replace it")
        if force and any(out.iterdir()) and not (out / "model_index.json").is_file():
            raise BadInput(f"{out} is not a diffusers pipeline folder (no model_index.json); --force replaces only a model")
    if not out.parent.is_dir():
        raise BadInput(f"{out.parent}: no such folder")
    return out


def write_random_model(arch: str, out: Path, dtype: str = "fp16", force: bool = False,
                       configs: dict[str, dict] | None = None) -> dict:
    """Build `arch` with random weights into `out`: aside, then moved into place in one step.

    `configs` replaces the shipped configs of `arch` (the same layout as `load_configs`)."""
    from vfx.fsutil import replace_path
    from vfx.portable import portable_pipeline

    if arch not in ARCHS:
        raise BadInput(f"unknown --arch {arch!r}: use {', '.join(ARCHS)}")
    if dtype not in DTYPES:
        raise BadInput(f"unknown --dtype {dtype!r}: use {' or '.join(DTYPES)}")
    configs = configs if configs is not None else load_configs(arch)
    out = check_target(out, force)
    pipe = build_pipeline(configs, DTYPES[dtype])
    counts = {name: count_parameters(getattr(pipe, name))
              for name in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None}
    info = {"arch": arch, "architecture_of": ARCHS[arch][0], "dtype": dtype, "weights": "random (fixed seeds)",
            "pipeline": type(pipe).__name__, "parameters": counts}
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        pipe.save_pretrained(scratch, safe_serialization=True)
        del pipe
        portable_pipeline(scratch)
        (scratch / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        replace_path(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {**info, "model": str(out)}
