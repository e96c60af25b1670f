"""LoRA weights applied to a pipeline: what `vfx edit --lora` and `vfx sample --lora` load.

The file is diffusers' LoRA format (what `vfx train --mode lora` writes and `load_lora_weights` reads):
`unet.…` keys for the UNet part, `text_encoder.…` keys for the text encoder's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from vfx.errors import BadInput

LORA_FILE = "pytorch_lora_weights.safetensors"
ADAPTER = "lora"


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
