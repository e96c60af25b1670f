"""Inference weights of a DreamBooth run, and using them: full pipelines and LoRA files.

Full mode saves a diffusers pipeline folder (load it with StableDiffusionPipeline.from_pretrained, or
pass it as `--model`); LoRA mode saves `pytorch_lora_weights.safetensors` in diffusers' format (load it
with `pipe.load_lora_weights`, or `vfx.diffusion.lora.apply_lora`). Both folders also hold `dreambooth.json`:
the mode, the base model and the prompts the run was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vfx.diffusion.lora import LORA_FILE
from vfx.errors import BadInput, MissingStage
from vfx.fsutil import atomic_write_json, read_json
from vfx.graph import WHOLE, spec
from vfx.portable import portable_pipeline, text_encoder_keys
from vfx.stage import StageFolder, upstream

INFO_FILE = "dreambooth.json"


def save_lora(folder: Path, unet, text_encoders: list | None = None) -> Path:
    """The trained LoRA layers in diffusers' layout, readable by `load_lora_weights` on every maintained
    stack (SDXL's, by StableDiffusionXLPipeline's): the text encoders' keys under `text_encoder.text_model.…`
    and `text_encoder_2.text_model.…` (transformers 4.x names them so, and 5.x reads them), and
    alpha/rank folded into the up weights, so loaders that assume alpha = rank (diffusers before 0.35,
    which ignore the metadata) give the trained model exactly.
    """
    import inspect

    import diffusers

    from vfx.diffusion.text import is_sdxl_unet

    unet_layers, unet_meta = lora_layers(unet)
    encoders = text_encoders or []
    pipeline = getattr(diffusers, "StableDiffusionXLPipeline" if is_sdxl_unet(unet) else "StableDiffusionPipeline")
    kwargs = {"unet_lora_layers": unet_layers}
    metadata = {"unet_lora_adapter_metadata": unet_meta}
    for name, encoder in zip(("text_encoder", "text_encoder_2"), encoders):
        layers, metadata[f"{name}_lora_adapter_metadata"] = lora_layers(encoder)
        renamed = text_encoder_keys(layers, type(encoder).__name__)
        kwargs[f"{name}_lora_layers"] = {renamed[k]: v for k, v in layers.items()}
    if "unet_lora_adapter_metadata" in inspect.signature(pipeline.save_lora_weights).parameters:
        kwargs.update(metadata)
    pipeline.save_lora_weights(str(folder), safe_serialization=True, **kwargs)
    return Path(folder) / LORA_FILE


def lora_layers(model) -> tuple[dict, dict]:
    """A model's LoRA layers in diffusers' layout with alpha/rank folded in, and the adapter metadata
    that says so (rank, alpha = rank, target modules; nothing a loader's older peft would not know)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    config = model.peft_config["default"]
    scale = config.lora_alpha / config.r
    layers = {k: v * scale if ".lora_B." in k else v for k, v in get_peft_model_state_dict(model).items()}
    meta = {"r": config.r, "lora_alpha": config.r, "target_modules": sorted(config.target_modules)}
    return convert_state_dict_to_diffusers(layers), meta


def with_trained(base_pipe, unet, text_encoders: list):
    """A pipeline of the base model's class and components, with these UNet and text encoders (SD: no
    safety checker)."""
    from diffusers import StableDiffusionPipeline

    from vfx.diffusion.text import is_sdxl

    if is_sdxl(base_pipe):
        parts = {**base_pipe.components, "unet": unet, "text_encoder": text_encoders[0],
                 "text_encoder_2": text_encoders[1]}
        return type(base_pipe)(**parts, force_zeros_for_empty_prompt=base_pipe.config.force_zeros_for_empty_prompt)
    return StableDiffusionPipeline(
        vae=base_pipe.vae, text_encoder=text_encoders[0], tokenizer=base_pipe.tokenizer, unet=unet,
        scheduler=base_pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_full(folder: Path, base_pipe, unet, text_encoders: list) -> Path:
    """A complete diffusers pipeline: the base model's components with the trained UNet / text encoders."""
    with_trained(base_pipe, unet, text_encoders).save_pretrained(str(folder), safe_serialization=True)
    portable_pipeline(folder)
    return Path(folder)


def write_info(folder: Path, info: dict) -> None:
    atomic_write_json(Path(folder) / INFO_FILE, info)


@dataclass
class TrainedWeights:
    """What `vfx train` left in dreambooth/<RUN>/weights/."""

    folder: Path
    mode: str  # full | lora
    base_spec: str
    base_identity: str
    key: str  # the artifact's name as a downstream input
    fingerprint: str
    info: dict  # dreambooth.json: the run's mode, base model, prompts, rank and the base's architecture

    @property
    def lora(self) -> Path | None:
        return self.folder / LORA_FILE if self.mode == "lora" else None

    def input(self) -> dict[str, str]:
        return {self.key: self.fingerprint}


def trained_weights(project, name: str) -> TrainedWeights:
    """The run's complete weights, or a MissingStage error naming the command that makes them."""
    found = upstream(project, "train", WHOLE, name)
    info = read_json(found.folder / INFO_FILE)
    command = spec("train").command_for(project.root, name)
    if not info:
        raise MissingStage(f"train {name}", command)
    if StageFolder(found.folder).check_unit(0) == "damaged":
        raise BadInput(f"{found.folder} is damaged: a weights file no longer matches its checksum from training; "
                       f"run `{command} --force` to train it again")
    return TrainedWeights(found.folder, info["mode"], info["base_model_spec"], info["base_model"], found.key,
                          found.fingerprint, info)
