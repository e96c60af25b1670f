"""`vfx export`: a DreamBooth run's weights in the files other tools load.

- `diffusers`: the LoRA file, or the full pipeline folder, as `vfx train` made them (both load under
  transformers 4.x and 5.x, with diffusers >= 0.30).
- `kohya`: a LoRA as one `.safetensors` in kohya's layout (`lora_unet_…`, `lora_te_…` — SDXL:
  `lora_te1_…`, `lora_te2_…` — `.alpha`, `ss_*` metadata): what A1111, ComfyUI and kohya's scripts
  load. Converted with diffusers' `convert_state_dict_to_kohya`.
- `checkpoint`: a full fine-tune (SD 1.x, 2.x or SDXL) as one original-layout (LDM) `.safetensors`, for
  `from_single_file(..., config=BASE)`, A1111 and ComfyUI. The key map is vfx's own (vfx.ldm_layout):
  diffusers' library converts only the other way.

The export is written beside PATH and renamed into place when complete; an existing PATH is
replaced only with --force.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from vfx import log
from vfx.errors import BadInput
from vfx.fsutil import output_file, replace_path
from vfx.stage import RECORD
from vfx.dreambooth.weights import TrainedWeights, trained_weights

FORMATS = ("kohya", "diffusers", "checkpoint")


def export(project, name: str, fmt: str, out: Path, force: bool = False) -> dict:
    if fmt not in FORMATS:
        raise BadInput(f"invalid --format {fmt!r}: use one of {', '.join(FORMATS)}")
    weights = trained_weights(project, name)
    out = Path(out).expanduser().absolute()
    check_target(out, force)
    if fmt == "kohya" and weights.mode != "lora":
        raise BadInput(f"run {name} is a full fine-tune: --format kohya is for LoRA runs; "
                       "use --format checkpoint (one .safetensors) or diffusers (a folder)")
    if fmt == "checkpoint" and weights.mode != "full":
        raise BadInput(f"run {name} is a LoRA: --format checkpoint is for full fine-tunes; use --format kohya")
    if not (fmt == "diffusers" and weights.mode == "full"):  # everything else is one file
        output_file(out, "--out", ".safetensors")
    scratch = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        WRITERS[fmt](weights, scratch, name)
        replace_path(scratch, out)
    finally:
        if scratch.is_dir():
            shutil.rmtree(scratch)
        scratch.unlink(missing_ok=True)
    log.info(f"export: {fmt} weights of run {name} in {out}")
    return {"state": "complete", "name": name, "format": fmt, "mode": weights.mode, "out": str(out)}


def check_target(out: Path, force: bool) -> None:
    if out.is_symlink():
        raise BadInput(f"--out {out} is a symbolic link; vfx does not write through links")
    if out.exists() and not force:
        raise BadInput(f"--out {out} already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise BadInput(f"--out {out}: the folder {out.parent} does not exist")


# ---------------------------------------------------------------- writers


def write_diffusers(weights: TrainedWeights, target: Path, name: str) -> None:
    if weights.lora is not None:
        shutil.copyfile(weights.lora, target)
        return
    shutil.copytree(weights.folder, target, ignore=shutil.ignore_patterns(RECORD, ".*"))


def write_kohya(weights: TrainedWeights, target: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    sdxl = base_family(weights) == "sdxl"
    state = kohya_layers(load_file(str(weights.lora)), has_second_text_encoder=sdxl)
    version = "sdxl_base_v1-0" if sdxl else "sd_v2" if is_v2(weights) else "sd_v1"
    save_file(state, str(target), metadata=kohya_metadata(weights.info, name, version))


def kohya_layers(state: dict, has_second_text_encoder: bool) -> dict:
    """diffusers-layout LoRA layers (alpha already folded in) -> kohya's names, with alpha = rank."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    peft = {f"unet.{k}": v for k, v in convert_unet_state_dict_to_peft(part(state, "unet.")).items()}
    for encoder in ("text_encoder", "text_encoder_2"):
        text = part(state, f"{encoder}.")
        if text:
            peft.update({f"{encoder}.{k}": v for k, v in convert_state_dict_to_peft(text).items()})
    kohya = convert_state_dict_to_kohya(peft)
    if not has_second_text_encoder:  # SD 1.x/2.x: kohya names the one text encoder `lora_te`
        kohya = {k.replace("lora_te1_", "lora_te_", 1): v for k, v in kohya.items()}
    return {k: v.to(torch.float32) if k.endswith(".alpha") else v.contiguous() for k, v in kohya.items()}


def part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def kohya_metadata(info: dict, name: str, version: str) -> dict[str, str]:
    """The `ss_*` fields kohya's scripts write and A1111/ComfyUI show (every value a string); `version`
    is kohya's base model version (sd_v1, sd_v2, sdxl_base_v1-0)."""
    rank = str(info.get("rank"))
    return {
        "ss_network_module": "networks.lora", "ss_network_dim": rank,
        "ss_network_alpha": rank,  # the trained alpha/rank is folded into the up weights
        "ss_base_model_version": version, "ss_v2": str(version == "sd_v2"),
        "ss_sd_model_name": str(info.get("base_model_spec")), "ss_output_name": name,
        "ss_steps": str(info.get("steps")), "ss_resolution": f"({info.get('resolution')}, {info.get('resolution')})",
        "ss_training_comment": f"vfx DreamBooth: {info.get('instance_prompt')}",
        "ss_text_encoder_trained": str(bool(info.get("train_text_encoder"))),
    }


def architecture_folder(weights: TrainedWeights) -> Path | None:
    """The pipeline folder of the run's architecture: its own (full) or its base model's (LoRA); None
    for a LoRA trained on a single-file checkpoint."""
    from vfx.models import pipeline_folder, resolve_model

    return weights.folder if weights.mode == "full" else pipeline_folder(resolve_model(weights.base_spec))


def base_family(weights: TrainedWeights) -> str:
    from vfx.models import family_of_unet, model_family, resolve_model

    if (family := weights.info.get("base_family")) is not None:  # recorded by training (not by older runs)
        return family
    folder = architecture_folder(weights)
    if folder is None:
        return model_family(resolve_model(weights.base_spec))  # a single file: from its tensor names
    return family_of_unet(config(folder / "unet"))


def is_v2(weights: TrainedWeights) -> bool:
    """SD 2.x uses OpenCLIP (gelu; in a single file, under `cond_stage_model.model.`); SD 1.x uses OpenAI
    CLIP (quick_gelu)."""
    from vfx.models import checkpoint_header, is_open_clip, resolve_model

    if (v2 := weights.info.get("base_v2")) is not None:
        return v2
    folder = architecture_folder(weights)
    if folder is None:
        location = Path(resolve_model(weights.base_spec).location)
        if location.suffix != ".safetensors":
            return False
        with checkpoint_header(location) as header:
            return any(key.startswith("cond_stage_model.model.") for key in header.keys())
    path = folder / "text_encoder" / "config.json"
    return path.is_file() and is_open_clip(json.loads(path.read_text()))


def write_checkpoint(weights: TrainedWeights, target: Path, name: str) -> None:
    from safetensors.torch import save_file

    from vfx.ldm_layout import (SDXL_CLIP, SDXL_OPEN_CLIP, open_clip_to_ldm, text_encoder_to_ldm, unet_to_ldm,
                                vae_to_ldm)

    folder = weights.folder
    state = unet_to_ldm(component(folder / "unet"), config(folder / "unet"))
    state.update(vae_to_ldm(component(folder / "vae"), config(folder / "vae")))
    if base_family(weights) == "sdxl":
        state.update(text_encoder_to_ldm(component(folder / "text_encoder"), SDXL_CLIP))
        state.update(open_clip_to_ldm(component(folder / "text_encoder_2"), SDXL_OPEN_CLIP))
    else:
        text_to_ldm = open_clip_to_ldm if is_v2(weights) else text_encoder_to_ldm
        state.update(text_to_ldm(component(folder / "text_encoder")))
    save_file({k: v.contiguous() for k, v in state.items()}, str(target), metadata={"format": "pt"})


def config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def component(folder: Path) -> dict:
    """Every tensor of a saved model folder (one file or shards)."""
    from safetensors.torch import load_file

    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


WRITERS = {"diffusers": write_diffusers, "kohya": write_kohya, "checkpoint": write_checkpoint}
