"""`vfx regularize`: class-prior images from the base model -> dreambooth/<RUN>/class/.

The cache key is (base model identity, class prompt, negative prompt, seed, steps, guidance, size,
batch size, dtype). Image i uses seed + i and is generated in the fixed group i // batch_size, so which shard
makes it, or whether the run was interrupted, never changes its bytes (the batch size is in the key
because it decides which images share a UNet batch). Every PNG carries the key hash and its group in
a text chunk, so a changed key regenerates everything, an unchanged key never regenerates, and asking
for more (or fewer) images reuses every complete group that is still the same.
"""

from __future__ import annotations

from pathlib import Path

from vfx.errors import BadInput
from vfx.fsutil import atomic_write_json, read_json
from vfx.driver import Stage, drive
from vfx.settings import Settings
from vfx.stage import RECORD, Part, StageRun, fingerprint, is_complete
from vfx.store import chunk_ranges
from vfx.dreambooth.data import check_prompt, run_folder
from vfx.dreambooth.images import generate, native_resolution, png_meta, write_png
from vfx.dreambooth.tokens import load_tokenizer

FOLDER = "class"
MANIFEST = "manifest.json"


def image_name(index: int) -> str:
    return f"{index:06d}.png"


class Regularize(Stage):
    label = "regularize"
    unit_name = "batches"  # of --batch-size images

    def __init__(self, settings: Settings, name: str, class_prompt: str, num_images: int, steps: int,
                 guidance: float, seed: int | None, batch_size: int, size: int | None, negative_prompt: str):
        if num_images < 1:
            raise BadInput(f"invalid --num-images {num_images}: must be at least 1")
        if batch_size < 1:
            raise BadInput(f"invalid --batch-size {batch_size}: must be at least 1")
        if steps < 1:
            raise BadInput(f"invalid --steps {steps}: must be at least 1")
        if size is not None and (size < 8 or size % 8):
            raise BadInput(f"invalid --size {size}: must be a positive multiple of 8")
        if not class_prompt or not class_prompt.strip():
            raise BadInput("--class-prompt is empty: describe the class, e.g. 'a photo of a dog'")
        self.settings, self.prompt, self.num_images = settings, class_prompt, num_images
        self.folder = run_folder(settings.project, name) / FOLDER
        check_prompt(load_tokenizer(settings), class_prompt, "the class prompt")
        self.seed = int(settings.project.get("seed", seed))
        self.side = size or native_resolution(settings)
        self.key = {
            "model": settings.model.identity, "prompt": class_prompt, "negative_prompt": negative_prompt,
            "seed": self.seed, "steps": steps, "guidance": guidance, "width": self.side, "height": self.side,
            "batch_size": batch_size, "dtype": settings.dtype_name,
        }
        self.key_hash = fingerprint(self.key)
        self.ranges = chunk_ranges(num_images, batch_size)  # images generated together: a unit of work
        params = {**self.key, "num_images": num_images, "model_spec": settings.model.spec}
        self.run = StageRun(self.folder, "regularize", params, {}, len(self.ranges), force=settings.force,
                            shard=settings.shard)

    def prepare(self) -> None:
        self.pipe = self.settings.pipeline()

    def create(self) -> None:
        """Keep the groups whose PNGs match the key; drop everything else (stale for this key)."""
        keep: set[Path] = set()
        for unit, (start, end) in enumerate(self.ranges):
            paths = [self.folder / image_name(i) for i in range(start, end)]
            metas = [png_meta(path) for path in paths]
            if all(m and m.get("key") == self.key_hash and m.get("group") == [start, end] for m in metas):
                keep.update(paths)
                self.run.mark_done(unit, None, 0.0)
        for path in self.folder.glob("*.png"):
            if path not in keep:
                path.unlink(missing_ok=True)
        (self.folder / MANIFEST).unlink(missing_ok=True)

    def do_unit(self, unit: int, bar) -> None:
        start, end = self.ranges[unit]
        key = self.key
        seeds = [self.seed + i for i in range(start, end)]
        images = generate(self.pipe, [self.prompt] * (end - start), seeds, steps=key["steps"],
                          guidance=key["guidance"], width=self.side, height=self.side,
                          negative_prompt=key["negative_prompt"])
        for i, image in zip(range(start, end), images):
            write_png(self.folder / image_name(i), image,
                      {"key": self.key_hash, "group": [start, end], "index": i, "seed": self.seed + i})

    def parts(self, unit: int) -> list[Part]:
        return [Part(image_name(i)) for i in range(*self.ranges[unit])]

    def finalize(self) -> dict:
        key, seed = self.key, self.seed
        manifest = {
            "prompt": self.prompt, "negative_prompt": key["negative_prompt"], "model": key["model"],
            "model_spec": self.settings.model.spec, "key": self.key_hash, "width": self.side, "height": self.side,
            "steps": key["steps"], "guidance": key["guidance"], "seed": seed,
            "images": [{"file": image_name(i), "index": i, "seed": seed + i} for i in range(self.num_images)],
        }
        atomic_write_json(self.folder / MANIFEST, manifest)
        return {"images": self.num_images, "key": self.key_hash}

    def report(self, summary: dict) -> dict:
        return {"images": self.num_images, "key": self.key_hash}


def regularize(
    settings: Settings,
    name: str,
    class_prompt: str,
    num_images: int = 100,
    *,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int | None = None,
    batch_size: int = 4,
    size: int | None = None,
    negative_prompt: str = "",
) -> dict:
    return drive(Regularize(settings, name, class_prompt, num_images, steps, guidance, seed, batch_size, size,
                            negative_prompt))


def class_images(folder: Path) -> dict | None:
    """The manifest of a complete class-image folder, or None when it is missing or unfinished."""
    if not is_complete(read_json(folder / RECORD)):
        return None
    return read_json(folder / MANIFEST)
