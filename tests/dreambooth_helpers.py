"""Shared pieces of the DreamBooth tests: generated subject photos, projects, CLI argument lists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from conftest import image_folder, ok, textured

PROMPT = "a photo of zwx dog"
CLASS_PROMPT = "a photo of a dog"


def make_photos(folder: Path, count: int = 3) -> Path:
    """Non-square textured images (so cropping matters), a stand-in for subject photos."""
    frames = [np.ascontiguousarray(textured(80, seed)[:, :72]) for seed in range(count)]
    return image_folder(folder, frames)


def make_project(root: Path, model: str = "tiny") -> Path:
    ok("init", root, "--model", model)
    return root


def project_with_class_images(base: Path) -> tuple[Path, Path, Path]:
    """(project, generated subject photos, 2 class images in dreambooth/prior/class) under `base`."""
    root = make_project(base / "proj")
    photos = make_photos(base / "photos")
    ok("regularize", root, "--name", "prior", "--class-prompt", CLASS_PROMPT, "--num-images", "2", "--steps", "2")
    return root, photos, run_dir(root, "prior") / "class"


def with_prior(class_dir, weight: str = "1.0") -> list:
    return ["--class-dir", class_dir, "--class-prompt", CLASS_PROMPT, "--prior-loss-weight", weight]


def train_args(root: Path, name: str, photos: Path, *extra: str, steps: int = 4) -> list:
    return ["train", root, "--name", name, "--instance-dir", photos, "--instance-prompt", PROMPT,
            "--max-steps", str(steps), "--checkpoint-every", "2", "--learning-rate", "1e-3", *extra]


def run_dir(root: Path, name: str) -> Path:
    return root / "dreambooth" / name


def metrics(root: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir(root, name) / "metrics.jsonl").read_text().splitlines()]


def trained_tensors(root: Path, name: str) -> dict[str, torch.Tensor]:
    """The run's inference weights: the UNet of a full run, or the LoRA file."""
    weights = run_dir(root, name) / "weights"
    lora = weights / "pytorch_lora_weights.safetensors"
    if lora.is_file():
        return load_file(str(lora))
    tensors = load_file(str(weights / "unet" / "diffusion_pytorch_model.safetensors"))
    text = weights / "text_encoder" / "model.safetensors"
    tensors.update({f"text_encoder.{k}": v for k, v in load_file(str(text)).items()})
    return tensors


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def file_states(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under `folder`: to show nothing was rewritten."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}
