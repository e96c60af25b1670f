"""LoRA weights applied to a pipeline: what `vfx edit --lora` and `vfx sample --lora` load.

Any single .safetensors LoRA that diffusers' `load_lora_weights` reads: what `vfx train --mode lora`
writes (diffusers' layout), what `vfx export --format kohya` writes, and files from kohya, A1111 or
ComfyUI users.
"""

from __future__ import annotations

import contextlib
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
    """Load a LoRA into `pipe` through diffusers' own loader, so every layout it reads works here:
    diffusers and peft files (`unet.…`, `text_encoder.…`), kohya/A1111 (`lora_unet_…`, `lora_te_…`,
    `.alpha`). Both the UNet and the text-encoder parts load; the adapter is active at `scale`, and
    scale 0 gives exactly the base model's outputs. A file none of whose layers fit is refused.
    """
    from safetensors.torch import load_file

    file = lora_file(path)
    try:
        state = load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds for a damaged file
        raise BadInput(f"{file} is not a readable safetensors file: {exc}") from None
    try:
        with diffusers_logging_off():  # a failed load is logged over many lines; vfx says it in one
            pipe.load_lora_weights(state, adapter_name=adapter_name)
    except Exception as exc:  # noqa: BLE001 - diffusers and peft raise many kinds for a foreign file
        raise BadInput(f"{file} is not a LoRA this model can load: {exc}") from None
    loaded = [part for part, names in pipe.get_list_adapters().items() if adapter_name in names]
    if not loaded:
        raise BadInput(f"{file} holds no LoRA layers this model has (UNet or text encoder)")
    pipe.set_adapters([adapter_name], adapter_weights=[float(scale)])
    return pipe



@contextlib.contextmanager
def diffusers_logging_off():
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        logging.set_verbosity(level)
