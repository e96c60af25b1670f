"""CLIP and DINO embeddings for the metrics, from local model folders only.

Images are preprocessed here with PIL and numpy (no torchvision), following the folder's
preprocessor_config.json when it has one: resize the short side, centre-crop, normalise.
Embeddings are L2-normalised, so a dot product is a cosine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from vfx import log
from vfx.errors import BadInput

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def model_folder(spec: str | Path, flag: str) -> Path:
    """A model given as `--model` takes folders: a local folder, or a Hub id already in the local cache."""
    from vfx.models import cached_hub_folder

    path = Path(spec).expanduser()
    if path.is_dir() or str(spec).startswith((".", "/", "~")):
        return path
    return cached_hub_folder(str(spec), flag) or path


def _read_config(folder: Path, what: str, flag: str) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"{flag} {folder}: no such folder")
    try:
        return json.loads((folder / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        raise BadInput(f"{flag} {folder} is not a {what} model folder (no readable config.json)") from None


def model_identity(folder: Path) -> str:
    """For fingerprints: the folder's configs and weight file sizes/times (cheap, changes with the model)."""
    from vfx.models import _hash_folder_configs

    return f"{Path(folder).resolve()}:{_hash_folder_configs(Path(folder))}"


# ---------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    short_side: int | None  # resize so the short side is this (None: resize straight to `crop`)
    crop: tuple[int, int]  # (height, width) fed to the model
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def for_folder(cls, folder: Path, size: int, mean, std) -> "Preprocess":
        """The folder's own preprocessing when it says, else short side `size` + centre crop."""
        try:
            config = json.loads((Path(folder) / "preprocessor_config.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            config = {}
        mean = tuple(config.get("image_mean", mean))
        std = tuple(config.get("image_std", std))
        resize, crop = config.get("size"), config.get("crop_size")

        def pair(value) -> tuple[int, int]:
            if isinstance(value, dict):
                if "shortest_edge" in value:
                    return int(value["shortest_edge"]), int(value["shortest_edge"])
                return int(value["height"]), int(value["width"])
            return int(value), int(value)

        short = resize.get("shortest_edge") if isinstance(resize, dict) else None
        if crop is not None and config.get("do_center_crop", True):
            return cls(int(short or min(pair(crop))), pair(crop), mean, std)
        if resize is not None:
            return cls(int(short), pair(resize), mean, std) if short else cls(None, pair(resize), mean, std)
        return cls(size, (size, size), mean, std)

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 RGB images (any sizes) -> float32 [n, 3, h, w], normalised."""
        height, width = self.crop
        batch = []
        for array in images:
            image = Image.fromarray(np.ascontiguousarray(array))
            if self.short_side is None:
                image = image.resize((width, height), Image.BICUBIC)
            else:
                scale = self.short_side / min(image.size)
                new = (max(width, round(image.size[0] * scale)), max(height, round(image.size[1] * scale)))
                image = image.resize(new, Image.BICUBIC)
                left, top = (new[0] - width) // 2, (new[1] - height) // 2
                image = image.crop((left, top, left + width, top + height))
            batch.append(np.asarray(image, dtype=np.float32) / 255.0)
        x = (np.stack(batch) - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _features(output) -> torch.Tensor:
    # transformers 4 returns a tensor; transformers 5 an output whose pooler_output is projected.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalise(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu().double().numpy()
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def quiet_transformers() -> None:
    # Loading reports and progress bars would land on stderr between our own lines.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ---------------------------------------------------------------- models


class Clip:
    """A CLIP model folder (transformers CLIPModel + its tokenizer): image and text embeddings.

    The folder is checked at once; the weights load on first use, so an up-to-date eval never
    pays for them.
    """

    def __init__(self, folder: Path, device: torch.device | str = "cpu", batch_size: int = 16):
        self.folder = model_folder(folder, "--clip")
        config = _read_config(self.folder, "CLIP", "--clip")
        if config.get("model_type") != "clip":
            raise BadInput(f"--clip {self.folder} is not a CLIP model folder (its config.json has model_type "
                           f"{config.get('model_type')!r}, expected 'clip')")
        from transformers import CLIPConfig

        image_size = CLIPConfig.from_dict(config).vision_config.image_size
        self.device, self.batch_size = torch.device(device), batch_size
        self.identity = model_identity(self.folder)
        self.preprocess = Preprocess.for_folder(self.folder, image_size, CLIP_MEAN, CLIP_STD)
        self._model = self._tokenizer = None
        self._texts: dict[tuple[str, ...], np.ndarray] = {}  # every chunk of an eval asks for the same prompt

    def _load(self) -> None:
        from transformers import AutoTokenizer, CLIPModel

        quiet_transformers()
        try:
            self._model = CLIPModel.from_pretrained(str(self.folder)).to(self.device).eval()
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        except Exception as exc:  # noqa: BLE001 - any loading failure is the user's folder
            raise BadInput(f"--clip {self.folder}: cannot load a CLIP model and tokenizer: {str(exc).splitlines()[0]}") from None

    @property
    def model(self):
        if self._model is None:
            self._load()
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._load()
        return self._tokenizer

    @torch.no_grad()
    def images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            x = self.preprocess(images[start : start + self.batch_size]).to(self.device)
            out.append(_normalise(_features(self.model.get_image_features(pixel_values=x))))
        return np.concatenate(out)

    def texts(self, prompts: Sequence[str]) -> np.ndarray:
        key = tuple(prompts)
        if key not in self._texts:
            self._texts[key] = self._embed_texts(key)
        return self._texts[key]

    @torch.no_grad()
    def _embed_texts(self, prompts: Sequence[str]) -> np.ndarray:
        limit = min(int(self.tokenizer.model_max_length), int(self.model.config.text_config.max_position_embeddings))
        for prompt in prompts:
            if len(self.tokenizer(prompt)["input_ids"]) > limit:
                log.warn(f"CLIP-T: prompt longer than CLIP's {limit} tokens, truncated: {prompt[:60]}...")
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        return _normalise(_features(self.model.get_text_features(**tokens)))


class Dino:
    """A ViT / DINO folder (transformers AutoModel): the CLS token of the last layer."""

    def __init__(self, folder: Path, device: torch.device | str = "cpu", batch_size: int = 16):
        folder = model_folder(folder, "--dino")
        config = _read_config(folder, "ViT/DINO", "--dino")
        if config.get("model_type") == "clip" or "image_size" not in config:
            raise BadInput(f"--dino {folder} is not a ViT/DINO model folder (expected a vision transformer "
                           f"config with image_size; got model_type {config.get('model_type')!r})")
        from transformers import AutoModel

        quiet_transformers()
        try:
            self.model = AutoModel.from_pretrained(str(folder)).to(device).eval()
        except Exception as exc:  # noqa: BLE001
            raise BadInput(f"--dino {folder}: cannot load a vision model: {str(exc).splitlines()[0]}") from None
        self.device, self.batch_size = torch.device(device), batch_size
        self.identity = model_identity(folder)
        self.preprocess = Preprocess.for_folder(folder, int(config["image_size"]), IMAGENET_MEAN, IMAGENET_STD)

    @torch.no_grad()
    def images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            x = self.preprocess(images[start : start + self.batch_size]).to(self.device)
            hidden = self.model(pixel_values=x).last_hidden_state
            out.append(_normalise(hidden[:, 0]))
        return np.concatenate(out)


# ---------------------------------------------------------------- scores


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] cosines of unit embeddings (clipped: rounding can step past +-1)."""
    return np.clip(np.asarray(a) @ np.asarray(b).T, -1.0, 1.0)


def consecutive_cosines(embeddings: np.ndarray) -> list[float]:
    """Cosine of each embedding with the next (CLIP-F per pair)."""
    return [float(cosines(a[None], b[None])[0, 0]) for a, b in zip(embeddings[:-1], embeddings[1:])]


def mean_pairwise_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine over all pairs (one of `a`, one of `b`): CLIP-I and DINO of DreamBooth."""
    return float(cosines(a, b).mean())
