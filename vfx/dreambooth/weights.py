"""Inference weights of a DreamBooth run, and using them: full pipelines and LoRA files.

Full mode saves a diffusers pipeline folder (load it with StableDiffusionPipeline.from_pretrained, or
pass it as `--model`); LoRA mode saves `pytorch_lora_weights.safetensors` in diffusers' format (load it
with `pipe.load_lora_weights`, or `apply_lora` below). Both folders also hold `dreambooth.json`:
the mode, the base model and the prompts the run was trained with.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from vfx.errors import BadInput, MissingStage
from vfx.fsutil import atomic_write_json, read_json
from vfx.stage import RECORD

LORA_FILE = "pytorch_lora_weights.safetensors"
INFO_FILE = "dreambooth.json"
ADAPTER = "dreambooth"


def lora_file(path: str | Path) -> Path:
    """The LoRA safetensors file at `path`: the file itself, or a weights folder holding one."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise BadInput(f"{path}: no LoRA file here (expected {LORA_FILE} made by `vfx train --mode lora`)")
    if path.suffix != ".safetensors":
        raise BadInput(f"{path}: LoRA weights must be a .safetensors file")
    return path


def lora_identity(path: str | Path) -> str:
    """A hash of the LoRA file's bytes, for fingerprints of stages that use it."""
    return "lora:" + hashlib.sha256(lora_file(path).read_bytes()).hexdigest()[:16]


def apply_lora(pipe, path: str | Path, scale: float = 1.0, adapter_name: str = ADAPTER):
    """Load a LoRA made by `vfx train --mode lora` into `pipe` (UNet, and the text encoder when it was
    trained too) and make it active at `scale`. Scale 0 gives exactly the base model's outputs.

    The UNet part goes through diffusers' `load_lora_weights`; the text-encoder part is injected with
    peft directly, because transformers' own loader insists on a newer peft than diffusers needs.
    """
    from safetensors.torch import load_file

    file = lora_file(path)
    try:
        state = load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds for a damaged file
        raise BadInput(f"{file} is not a readable safetensors file: {exc}") from None
    unet_part = {k: v for k, v in state.items() if k.startswith("unet.")}
    text_part = {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")}
    if not unet_part and not text_part:
        raise BadInput(f"{file} holds no UNet or text-encoder LoRA layers")
    try:
        if unet_part:
            pipe.load_lora_weights(unet_part, adapter_name=adapter_name)
        if text_part:
            add_text_lora(pipe.text_encoder, text_part, adapter_name)
    except Exception as exc:  # noqa: BLE001 - diffusers and peft raise many kinds for a foreign file
        raise BadInput(f"{file} is not a LoRA this model can load: {exc}") from None
    pipe.set_adapters([adapter_name], adapter_weights=[float(scale)])
    return pipe


def add_text_lora(text_encoder, state: dict, adapter_name: str) -> None:
    """Inject and fill the text encoder's LoRA layers (alpha = rank, as `vfx train` makes them)."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(dict(state)))
    rank = next(v.shape[0] for k, v in state.items() if ".lora_A." in k)
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state})
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)
    inject_adapter_in_model(config, text_encoder, adapter_name=adapter_name)
    set_peft_model_state_dict(text_encoder, state, adapter_name=adapter_name)
    text_encoder.to(next(p for n, p in text_encoder.named_parameters() if "lora_" not in n).dtype)


def save_lora(folder: Path, unet, text_encoder=None) -> Path:
    """The trained LoRA layers in diffusers' format (what `load_lora_weights` reads)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    text_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder)) if text_encoder else None
    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers, safe_serialization=True
    )
    return Path(folder) / LORA_FILE


def save_full(folder: Path, base_pipe, unet, text_encoder) -> Path:
    """A complete diffusers pipeline: the base model's components with the trained UNet / text encoder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=base_pipe.vae, text_encoder=text_encoder, tokenizer=base_pipe.tokenizer, unet=unet,
        scheduler=base_pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
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
    fingerprint: str

    @property
    def lora(self) -> Path | None:
        return self.folder / LORA_FILE if self.mode == "lora" else None


def trained_weights(run_dir: Path, command: str) -> TrainedWeights:
    """The run's complete weights, or a MissingStage error naming the command that makes them."""
    folder = Path(run_dir) / "weights"
    record = read_json(folder / RECORD)
    info = read_json(folder / INFO_FILE)
    if not record or record.get("state") != "complete" or not info:
        raise MissingStage("train", command)
    return TrainedWeights(folder, info["mode"], info["base_model_spec"], info["base_model"], record["fingerprint"])
