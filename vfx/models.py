"""Resolving `--model` and loading pipelines (SD 1.x/2.x, SDXL, the SD 2 depth model, told by their
configs), and the cache of the embedded tiny models (built by vfx.tiny_models)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vfx import log
from vfx.errors import BadInput
from vfx.fsutil import file_lock, replace_path

if TYPE_CHECKING:
    import torch  # imported where weights load: resolving a model (`vfx status`) needs no torch

# 2: the ControlNet's zero convolutions carry weights, so control reaches the UNet;
# 3: the VAE's scaling factor gives unit-variance latents;
# 4: text encoder and tokenizer files in the layout transformers 4.x reads too (same weights);
# 5: a trained VAE (scripts/train_tiny_vae.py), so decoded frames look like the video.
TINY_VERSION = 5
TINY_NAMES = ("tiny", "tiny-v", "tiny-xl", "tiny-depth")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    return Path(os.environ.get("VFX_CACHE_DIR", Path.home() / ".cache" / "vfx"))


def tiny_model_dir(variant: str = "tiny") -> Path:
    """The cached tiny model, built on first use (safe when several processes start at once)."""
    target = cache_dir() / f"{variant}-v{TINY_VERSION}"
    if (target / "VFX_TINY_MODEL").is_file():
        return target
    with file_lock(cache_dir() / f".{variant}.lock"):
        if not (target / "VFX_TINY_MODEL").is_file():
            scratch = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=f".{variant}-"))
            try:
                from vfx.tiny_models import build_tiny

                build_tiny(scratch, variant)
                replace_path(scratch, target)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    return target


def reads_depth(spec: str | None) -> bool:
    """Whether the model `spec` names (None: the embedded default) reads depth maps, so that `vfx depth`
    runs before its inversion."""
    return model_family(resolve_model(spec)) == "depth"


# ---------------------------------------------------------------- loading


@dataclass
class ModelRef:
    """What `--model` resolved to: a kind, a location and a stable identity for fingerprints."""

    spec: str
    kind: str  # tiny | folder | single-file | hub
    location: str
    identity: str

    @property
    def is_tiny(self) -> bool:
        return self.kind == "tiny"


def _hash_folder_configs(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in {".json", ".txt"}:
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
        elif path.is_file() and path.suffix in {".safetensors", ".bin"}:
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        if size > 2 << 20:
            handle.seek(-(1 << 20), os.SEEK_END)
            digest.update(handle.read())
    return digest.hexdigest()[:16]


PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


def refuse_pickled_weights(folder: Path) -> None:
    """A pipeline folder whose component has only pickled weights would be unpickled on load: refuse."""
    for component in [folder, *(p for p in folder.iterdir() if p.is_dir())]:
        files = [p for p in component.iterdir() if p.is_file()]
        pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES]
        if pickled and not any(p.suffix == ".safetensors" for p in files):
            raise BadInput(
                f"{pickled[0]} holds pickled weights, which can run code when loaded; "
                "convert them to .safetensors, or pass --allow-pickle if you trust them"
            )


def cached_hub_folder(spec: str, what: str) -> Path | None:
    """The local snapshot of Hub id `spec` (nothing is downloaded), or None when `spec` is no Hub id."""
    if not _HUB_ID.match(spec):
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:
        raise BadInput(
            f"{what} {spec!r} is not in the local Hugging Face cache and downloads are off here; "
            "download it where you have network (`hf download ID`), or pass a local folder"
        ) from None


def resolve_model(spec: str | None, allow_pickle: bool = False) -> ModelRef:
    """Turn `--model` into a ModelRef, or a clear error. Nothing is downloaded."""
    spec = (spec or "tiny").strip()
    if spec in TINY_NAMES:
        return ModelRef(spec, "tiny", spec, f"{spec}@{TINY_VERSION}")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BadInput(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        if not allow_pickle:
            refuse_pickled_weights(path)
        return ModelRef(spec, "folder", str(path.resolve()), f"folder:{_hash_folder_configs(path)}")
    if path.is_file():
        if path.suffix == ".safetensors":
            return ModelRef(spec, "single-file", str(path.resolve()), f"file:{_hash_file(path)}")
        if path.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise BadInput(
                    f"{path.name} is a pickle checkpoint, which can run code when loaded; "
                    "convert it to .safetensors, or pass --allow-pickle if you trust it"
                )
            return ModelRef(spec, "single-file", str(path.resolve()), f"file:{_hash_file(path)}")
        raise BadInput(f"{path} is not a model: expected a diffusers folder or a .safetensors file")
    if spec.startswith((".", "/", "~")) or path.suffix.lower() in {".safetensors", *PICKLE_SUFFIXES}:
        raise BadInput(f"model {spec!r} not found: no such file or folder")
    if _HUB_ID.match(spec):
        local = cached_hub_folder(spec, "model")
        if not allow_pickle:
            refuse_pickled_weights(Path(local))
        return ModelRef(spec, "hub", str(local), f"hub:{spec}:{Path(local).name}")
    raise BadInput(f"unknown model {spec!r}: use {', '.join(TINY_NAMES)}, a diffusers folder, a .safetensors file or a "
                   "cached Hub id")


def pipeline_folder(ref: ModelRef) -> Path | None:
    """The diffusers folder a model loads from; None for a single-file checkpoint."""
    if ref.is_tiny:
        return tiny_model_dir(ref.location)
    return Path(ref.location) if ref.kind in {"folder", "hub"} else None


# ---------------------------------------------------------------- model families

# The diffusers pipeline class of each family vfx runs.
PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "depth": "StableDiffusionDepth2ImgPipeline"}
DEPTH_CHANNELS = 5  # a depth-conditioned UNet reads the 4 latent channels and the depth map


def family_of_unet(config: dict) -> str:
    """'sdxl' for a UNet micro-conditioned on pooled text and time ids, 'depth' for one that also reads
    a depth map (stable-diffusion-2-depth), 'sd' (1.x/2.x) otherwise."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "depth" if config.get("in_channels") == DEPTH_CHANNELS else "sd"


def is_open_clip(text_encoder_config: dict) -> bool:
    """SD 2.x's text encoder is OpenCLIP (gelu), SD 1.x's OpenAI CLIP (quick_gelu)."""
    return text_encoder_config.get("hidden_act") == "gelu"


@contextlib.contextmanager
def checkpoint_header(path: Path):
    """A single-file .safetensors checkpoint opened for its header (tensor names and shapes, no data)."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds for a damaged file
        raise BadInput(f"{Path(path).name} is not a readable safetensors checkpoint: {exc}") from None
    with handle as weights:
        yield weights


def family_of_checkpoint(path: Path) -> str:
    """The family of a single-file .safetensors checkpoint, from its tensor names (the header only):
    SDXL's original layout keeps its two text encoders under `conditioner.embedders`; a depth model's
    first convolution reads 5 channels."""
    first = "model.diffusion_model.input_blocks.0.0.weight"
    with checkpoint_header(path) as weights:
        keys = weights.keys()
        in_channels = weights.get_slice(first).get_shape()[1] if first in keys else None
    if any(key.startswith("conditioner.embedders.1.") for key in keys):
        return "sdxl"
    return "depth" if in_channels == DEPTH_CHANNELS else "sd"


def model_family(ref: ModelRef, model_config: str | None = None) -> str:
    """The family of `ref`, read from its UNet config (or, for a single file, its --model-config's or
    its tensor names); a pickled single file without --model-config is taken as SD 1.x/2.x."""
    if ref.kind == "single-file" and not model_config:
        return family_of_checkpoint(Path(ref.location)) if ref.location.endswith(".safetensors") else "sd"
    if ref.kind == "single-file":
        folder = Path(model_config) if Path(model_config).is_dir() else cached_hub_folder(model_config, "--model-config")
    else:
        folder = pipeline_folder(ref)
    try:
        return family_of_unet(json.loads((folder / "unet" / "config.json").read_text()))
    except (OSError, ValueError):
        raise BadInput(f"{folder} has no readable unet/config.json: cannot tell which model family it is") from None


# ---------------------------------------------------------------- loading

_warned_tiny = False


def _note_tiny(ref: ModelRef) -> None:
    global _warned_tiny
    if ref.is_tiny and not _warned_tiny:
        log.note("using the embedded tiny model: its outputs are not meaningful images")
        _warned_tiny = True


def load_pipeline(ref: ModelRef, device: torch.device, dtype: torch.dtype, model_config: str | None = None):
    """The model's pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline or, without its depth
    estimator, StableDiffusionDepth2ImgPipeline: told by its config) on `device`; the VAE stays fp32
    (fp16 VAEs are known to overflow)."""
    import diffusers
    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    family = model_family(ref, model_config)
    pipeline_class = getattr(diffusers, PIPELINES[family])
    # A depth model's estimator is not loaded here: `vfx depth` runs it, on its own.
    extra = {"sd": {"safety_checker": None, "requires_safety_checker": False},
             "depth": {"depth_estimator": None, "feature_extractor": None}}.get(family, {})
    _note_tiny(ref)
    if ref.is_tiny:
        pipe = pipeline_class.from_pretrained(tiny_model_dir(ref.location), local_files_only=True, **extra)
    elif ref.kind in {"folder", "hub"}:
        try:
            pipe = pipeline_class.from_pretrained(ref.location, local_files_only=True, **extra)
        except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds for a folder it cannot read
            raise BadInput(f"could not load the model at {ref.location}: {type(exc).__name__}: {exc}") from None
    elif family == "depth":
        raise BadInput(f"{Path(ref.location).name}: a depth model loads from a diffusers folder, not a single file")
    else:
        kwargs = {"local_files_only": True}
        if model_config:
            kwargs["config"] = model_config
        try:
            pipe = pipeline_class.from_single_file(ref.location, **kwargs)
        except Exception as exc:
            raise BadInput(
                f"could not load single-file checkpoint {Path(ref.location).name}: {exc}. "
                "Pass --model-config with a diffusers folder or cached Hub id describing its architecture"
            ) from None
    if family == "sdxl" and getattr(pipe, "text_encoder", None) is None:
        raise BadInput(f"{ref.spec} has no first text encoder (an SDXL refiner?): vfx runs SDXL base models")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    pipe.unet.to(dtype)
    for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if encoder is not None:
            encoder.to(dtype)
    pipe.vae.to(torch.float32)
    return pipe


def load_vae(ref: ModelRef, device: torch.device):
    """The model's VAE alone, fp32 on `device`, as its pipeline would load it (the class its
    model_index.json names), without importing the pipeline and its text encoders: the stages that
    only encode or decode start seconds sooner. None for a single-file checkpoint (its VAE is inside)."""
    folder = pipeline_folder(ref)
    if folder is None:
        return None
    import diffusers
    import torch

    _note_tiny(ref)
    try:
        _, class_name = json.loads((folder / "model_index.json").read_text())["vae"]
        vae = getattr(diffusers, class_name).from_pretrained(folder, subfolder="vae", local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds for a folder it cannot read
        raise BadInput(f"could not load the VAE of the model at {folder}: {type(exc).__name__}: {exc}") from None
    return vae.to(device, torch.float32).eval()


def native_size(ref: ModelRef) -> int | None:
    """The side a model was trained at (the UNet's sample size times the VAE's downsampling), read
    from its folder's configs; None for a single-file checkpoint, whose configs are inside the weights."""
    folder = pipeline_folder(ref)
    if folder is None:
        return None
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def controlnet_dir(ref: ModelRef) -> Path | None:
    """The ControlNet bundled with the tiny model (real models take --control-model)."""
    if ref.is_tiny:
        return tiny_model_dir(ref.location) / "controlnet"
    return None


@dataclass
class ControlNetRef:
    """What `--control-model` (or the tiny model's default) resolved to."""

    location: str
    identity: str


def resolve_controlnet(model: ModelRef, spec: str | None) -> ControlNetRef:
    """A ControlNet folder (or cached Hub id); without `spec`, the tiny model's own. Nothing is downloaded."""
    if not spec:
        folder = controlnet_dir(model)
        if folder is None:
            raise BadInput(f"--control needs --control-model PATH (a diffusers ControlNet folder) for model {model.spec!r}")
        return ControlNetRef(str(folder), f"{model.identity}/controlnet")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BadInput(f"--control-model {path} is not a diffusers ControlNet folder (no config.json)")
        return ControlNetRef(str(path.resolve()), f"folder:{_hash_folder_configs(path)}")
    local = None if spec.startswith((".", "/", "~")) else cached_hub_folder(spec, "ControlNet")
    if local is not None:
        return ControlNetRef(str(local), f"hub:{spec}:{local.name}")
    raise BadInput(f"--control-model {spec!r}: no such folder")


def load_controlnet(ref: ControlNetRef, device: torch.device, dtype: torch.dtype):
    from diffusers import ControlNetModel

    try:
        controlnet = ControlNetModel.from_pretrained(ref.location, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds for a folder that is not a ControlNet
        raise BadInput(f"could not load the ControlNet at {ref.location}: {exc}") from None
    return controlnet.to(device, dtype).eval()


def scheduler_config(ref: ModelRef) -> dict | None:
    """The model's scheduler config read from its folder (no weights loaded); None for a single file."""
    if ref.is_tiny:
        folder = tiny_model_dir(ref.location)
    elif ref.kind in {"folder", "hub"}:
        folder = Path(ref.location)
    else:
        return None
    try:
        stored = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        import diffusers

        # Through the pipeline's own scheduler class, so its defaults fill what the file leaves out.
        return dict(getattr(diffusers, stored["_class_name"]).from_config(stored).config)
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None
