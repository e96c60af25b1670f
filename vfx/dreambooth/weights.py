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


def save_lora(folder: Path, unet, text_encoder=None) -> Path:
    """The trained LoRA layers in diffusers' layout, readable by `load_lora_weights` on every maintained
    stack: the text encoder's keys under `text_encoder.text_model.…` (transformers 4.x names them so,
    and 5.x reads them), and alpha/rank folded into the up weights, so loaders that assume alpha =
    rank (diffusers before 0.35, which ignore the metadata) give the trained model exactly.
    """
    import inspect

    from diffusers import StableDiffusionPipeline

    unet_layers, unet_meta = lora_layers(unet)
    text_layers, text_meta = lora_layers(text_encoder) if text_encoder is not None else (None, None)
    if text_layers is not None:
        renamed = text_encoder_keys(text_layers, type(text_encoder).__name__)
        text_layers = {renamed[k]: v for k, v in text_layers.items()}
    options = {}
    if "unet_lora_adapter_metadata" in inspect.signature(StableDiffusionPipeline.save_lora_weights).parameters:
        options = {"unet_lora_adapter_metadata": unet_meta, "text_encoder_lora_adapter_metadata": text_meta}
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=unet_layers,
                                              text_encoder_lora_layers=text_layers, safe_serialization=True, **options)
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


def save_full(folder: Path, base_pipe, unet, text_encoder) -> Path:
    """A complete diffusers pipeline: the base model's components with the trained UNet / text encoder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=base_pipe.vae, text_encoder=text_encoder, tokenizer=base_pipe.tokenizer, unet=unet,
        scheduler=base_pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
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
                          found.fingerprint)
