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
from vfx.stage import RECORD, Part, StageRun, fingerprint
from vfx.stages.common import Settings, outcome, run_units, up_to_date_result
from vfx.store import chunk_ranges
from vfx.dreambooth.data import check_prompt, run_folder
from vfx.dreambooth.images import generate, native_resolution, png_meta, write_png
from vfx.dreambooth.tokens import load_tokenizer

FOLDER = "class"
MANIFEST = "manifest.json"


def image_name(index: int) -> str:
    return f"{index:06d}.png"


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
    folder = run_folder(settings.project, name) / FOLDER
    check_prompt(load_tokenizer(settings), class_prompt, "the class prompt")
    seed = int(settings.project.get("seed", seed))
    side = size or native_resolution(settings)
    key = {
        "model": settings.model.identity, "prompt": class_prompt, "negative_prompt": negative_prompt, "seed": seed,
        "steps": steps, "guidance": guidance, "width": side, "height": side, "batch_size": batch_size,
        "dtype": settings.dtype_name,
    }
    key_hash = fingerprint(key)
    ranges = chunk_ranges(num_images, batch_size)  # images generated together: a unit of work
    params = {**key, "num_images": num_images, "model_spec": settings.model.spec}
    run = StageRun(folder, "regularize", params, {}, len(ranges), force=settings.force, shard=settings.shard)
    extra = {"images": num_images, "key": key_hash}
    if run.up_to_date() and not settings.force:
        return up_to_date_result(run, extra)

    def create() -> None:
        """Keep the groups whose PNGs match the key; drop everything else (stale for this key)."""
        keep: set[Path] = set()
        for unit, (start, end) in enumerate(ranges):
            paths = [folder / image_name(i) for i in range(start, end)]
            metas = [png_meta(path) for path in paths]
            if all(m and m.get("key") == key_hash and m.get("group") == [start, end] for m in metas):
                keep.update(paths)
                run.mark_done(unit, None, 0.0)
        for path in folder.glob("*.png"):
            if path not in keep:
                path.unlink(missing_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)

    pending = run.start(create)

    def work(unit: int, bar):
        start, end = ranges[unit]
        seeds = [seed + i for i in range(start, end)]
        images = generate(settings.pipeline(), [class_prompt] * (end - start), seeds, steps=steps, guidance=guidance,
                          width=side, height=side, negative_prompt=negative_prompt)
        for i, image in zip(range(start, end), images):
            write_png(folder / image_name(i), image, {"key": key_hash, "group": [start, end], "index": i, "seed": seed + i})
        return [images]

    def parts(unit: int) -> list[Part]:
        return [Part(image_name(i)) for i in range(*ranges[unit])]

    computed = run_units(run, pending, work, "regularize", on_start=settings.pipeline, parts=parts)

    def finalize() -> dict:
        manifest = {
            "prompt": class_prompt, "negative_prompt": negative_prompt, "model": settings.model.identity,
            "model_spec": settings.model.spec, "key": key_hash, "width": side, "height": side,
            "steps": steps, "guidance": guidance, "seed": seed,
            "images": [{"file": image_name(i), "index": i, "seed": seed + i} for i in range(num_images)],
        }
        atomic_write_json(folder / MANIFEST, manifest)
        return {"images": num_images, "key": key_hash}

    return outcome(run, run.finish(finalize), computed, extra)


def class_images(folder: Path) -> dict | None:
    """The manifest of a complete class-image folder, or None when it is missing or unfinished."""
    record = read_json(folder / RECORD)
    if not record or record.get("state") != "complete":
        return None
    return read_json(folder / MANIFEST)
