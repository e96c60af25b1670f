"""Training examples: the run folder, instance photos, class images, crops and flips, and example order."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from vfx.errors import BadInput
from vfx.media import IMAGE_SUFFIXES, image_files, read_image
from vfx.project import Project, validate_name

ROOT = "dreambooth"


def run_folder(project: Project, name: str) -> Path:
    """`dreambooth/<RUN>/` inside the project; the run name becomes a folder, so it is validated."""
    return project.path(ROOT, validate_name(name, "run name"))


def refuse_depth_model(settings) -> None:
    """DreamBooth trains and samples text-to-image models; a depth model's UNet also reads a depth map."""
    if settings.family == "depth":
        raise BadInput(f"{settings.model.spec} is a depth model (its UNet reads a depth map): DreamBooth in vfx "
                       "trains and samples text-to-image models (SD 1.x/2.x, SDXL)")


# ---------------------------------------------------------------- image folders


def list_images(folder: Path, what: str) -> list[Path]:
    """The image files of a folder, sorted by name, or a clear error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"{what} folder {folder} does not exist")
    files = image_files(folder)
    if not files:
        raise BadInput(
            f"{what} folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            "DreamBooth needs at least one (3-5 photos work best)"
        )
    return files


def read_images(files: list[Path]) -> list[np.ndarray]:
    """Every file decoded to RGB uint8; the first unreadable one stops everything with its name."""
    return [read_image(path) for path in files]


def describe_photos(files: list[Path], arrays: list[np.ndarray]) -> list[dict]:
    """Each photo's name and upright size (after its EXIF orientation), for the training record."""
    return [{"file": path.name, "width": int(a.shape[1]), "height": int(a.shape[0])} for path, a in zip(files, arrays)]


def photo_warnings(photos: list[dict], resolution: int) -> list[str]:
    """What about a set of instance photos is likely to hurt training: too few, or too small."""
    warnings = []
    if len(photos) < 3:
        warnings.append(f"only {len(photos)} instance photo(s): DreamBooth learns a subject best from 3-5 photos "
                        "taken from different angles")
    small = [p for p in photos if min(p["width"], p["height"]) < resolution]
    if small:
        listed = ", ".join(f"{p['file']} {p['width']}x{p['height']} (x{resolution / min(p['width'], p['height']):.2f})"
                           for p in small[:5]) + (f" and {len(small) - 5} more" if len(small) > 5 else "")
        warnings.append(f"{len(small)} photo(s) are smaller than the training resolution {resolution} and will be "
                        f"upscaled: {listed}")
    return warnings


def files_identity(files: list[Path]) -> str:
    """A hash of the files' names and bytes: changes when any photo changes."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def fit_short_side(image: np.ndarray, resolution: int) -> np.ndarray:
    """Scale so the short side equals `resolution` (the crop happens per example)."""
    height, width = image.shape[:2]
    scale = resolution / min(height, width)
    if scale == 1:
        return image
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(image, size, interpolation=interp))


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


@dataclass
class ImageSet:
    """Images scaled to the training resolution's short side, cropped square per example; `sizes` are
    their (height, width) before scaling."""

    images: list[np.ndarray]
    resolution: int
    random_crop: bool = False
    flip: bool = False
    sizes: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray], resolution: int, random_crop: bool = False, flip: bool = False):
        return cls([fit_short_side(a, resolution) for a in arrays], resolution, random_crop, flip,
                   [(int(a.shape[0]), int(a.shape[1])) for a in arrays])

    def __len__(self) -> int:
        return len(self.images)

    @property
    def fixed(self) -> bool:
        """Whether an image always gives the same pixels (so its latents can be cached)."""
        return not (self.random_crop or self.flip)

    def pixels(self, index: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[3, r, r] in [-1, 1]: centre or random crop, then a coin-flip mirror when flipping is on."""
        return self.draw(index, generator)[0]

    def draw(self, index: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """`pixels`, and the crop's top-left in the scaled image as the example shows it (mirrored with it)."""
        image, r = self.images[index], self.resolution
        if not self.random_crop:
            (top, left), x = self.centre_crop(index), self.centre(index)
        else:
            top = int(torch.randint(0, image.shape[0] - r + 1, (1,), generator=generator))
            left = int(torch.randint(0, image.shape[1] - r + 1, (1,), generator=generator))
            x = to_tensor(image[top : top + r, left : left + r])
        if self.flip and bool(torch.rand((), generator=generator) < 0.5):
            x, left = x.flip(-1), image.shape[1] - r - left
        return x, (top, left)

    def centre_crop(self, index: int) -> tuple[int, int]:
        height, width = self.images[index].shape[:2]
        return (height - self.resolution) // 2, (width - self.resolution) // 2

    def fixed_pixels(self) -> torch.Tensor:
        """[n, 3, r, r]: every image's centre crop."""
        return torch.stack([self.centre(i) for i in range(len(self))])

    def centre(self, index: int) -> torch.Tensor:
        """[3, r, r]: the centre crop, never mirrored (for caching and evaluation)."""
        top, left = self.centre_crop(index)
        return to_tensor(self.images[index][top : top + self.resolution, left : left + self.resolution])


# ---------------------------------------------------------------- example order


@dataclass
class ExampleOrder:
    """Which example each step uses: a fresh permutation per epoch, drawn from (seed, stream, epoch) alone.

    The whole state (epoch, position, current permutation) is saved in checkpoints, so a resumed run
    uses the same examples in the same order as an uninterrupted one.
    """

    count: int
    seed: int
    stream: int
    epoch: int = 0
    position: int = 0
    order: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.order:
            self.order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed, self.stream, epoch])
        return [int(i) for i in rng.permutation(self.count)]

    def take(self, n: int) -> list[int]:
        picked = []
        for _ in range(n):
            if self.position == self.count:
                self.epoch, self.position = self.epoch + 1, 0
                self.order = self._permutation(self.epoch)
            picked.append(self.order[self.position])
            self.position += 1
        return picked

    def state_dict(self) -> dict:
        return {"count": self.count, "epoch": self.epoch, "position": self.position, "order": list(self.order)}

    def load_state_dict(self, state: dict) -> None:
        if int(state["count"]) != self.count:
            raise BadInput(f"the checkpoint was made with {state['count']} examples here, not {self.count}")
        self.epoch, self.position, self.order = int(state["epoch"]), int(state["position"]), list(state["order"])


# ---------------------------------------------------------------- prompts


def check_prompt(tokenizer, prompt: str, what: str) -> str:
    """A prompt that fits the text encoder (longer ones would be silently cut)."""
    if not prompt or not prompt.strip():
        raise BadInput(f"{what} is empty")
    count = len(tokenizer(prompt, truncation=False).input_ids)
    if count > tokenizer.model_max_length:
        raise BadInput(
            f"{what} is {count} tokens long; this model reads at most {tokenizer.model_max_length}: shorten it"
        )
    return prompt


def identifier_problem(tokenizer, instance_prompt: str, class_prompt: str | None, identifier: str | None) -> str | None:
    """Why the instance prompt seems to lack a usable identifier, or None when it looks fine."""
    words = instance_prompt.lower().split()
    if identifier:
        if identifier.lower() not in words:
            return f"the instance prompt {instance_prompt!r} does not contain the identifier {identifier!r}"
        pieces = len(tokenizer(identifier, add_special_tokens=False).input_ids)
        if pieces > 1:
            return (f"the identifier {identifier!r} splits into {pieces} tokens; a single rare token binds the subject "
                    "better (`vfx tokens DIR` proposes some)")
        return None
    if class_prompt is not None and not set(words) - set(class_prompt.lower().split()):
        return (f"the instance prompt {instance_prompt!r} has no word the class prompt {class_prompt!r} lacks: "
                "add an identifier, e.g. 'a photo of zwx dog'")
    return None
