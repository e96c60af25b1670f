"""`vfx sample`: images from a DreamBooth run (trained full weights, or base + LoRA) or the base model.

Image j of prompt p uses seed + j, so every column of the grid compares prompts from the same starting
noise. Units of work are fixed groups of `batch_size` images, so shards never change an image's bytes.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from vfx import log
from vfx.errors import BadInput
from vfx.fsutil import atomic_write_json, read_json
from vfx.models import resolve_model
from vfx.stage import Part, StageRun
from vfx.stages.common import Settings, outcome, run_units, up_to_date_result
from vfx.dreambooth.data import check_prompt, run_folder
from vfx.dreambooth.images import generate, grid, native_resolution, write_png
from vfx.store import chunk_ranges
from vfx.dreambooth.tokens import load_tokenizer
from vfx.dreambooth.weights import INFO_FILE, apply_lora, lora_file, lora_identity, trained_weights

MANIFEST = "manifest.json"
GRID = "grid.png"


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read prompts file {path}: {exc}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise BadInput(f"prompts file {path} holds no prompts")
    return prompts


def image_name(prompt_index: int, image_index: int) -> str:
    return f"{prompt_index:03d}-{image_index:03d}.png"


def choose_model(settings: Settings, run_dir: Path, name: str, base: bool, lora: Path | None, model_given: bool):
    """(model, LoRA file or None, upstream inputs, default size, output folder) for this sampling."""
    if base:
        # The run's own base model, unless --model names another.
        info = read_json(run_dir / "weights" / INFO_FILE) or {}
        model = settings.model if model_given or not info else resolve_model(info["base_model_spec"])
        return model, None, {}, info.get("resolution"), run_dir / "samples-base"
    if lora is not None:
        return settings.model, lora_file(lora), {}, None, run_dir / "samples"
    root = shlex.quote(str(settings.project.root))
    weights = trained_weights(run_dir, f"vfx train {root} --name {name} --instance-dir PHOTOS --instance-prompt '...'")
    rel = str(weights.folder.relative_to(settings.project.root))
    inputs = {rel: weights.fingerprint}
    size = (read_json(weights.folder / INFO_FILE) or {}).get("resolution")
    if weights.mode == "full":
        return resolve_model(str(weights.folder)), None, inputs, size, run_dir / "samples"
    ref = resolve_model(weights.base_spec)
    if ref.identity != weights.base_identity:
        raise BadInput(f"the base model {weights.base_spec} changed since this LoRA was trained "
                       f"(identity {ref.identity}, trained on {weights.base_identity})")
    return ref, weights.lora, inputs, size, run_dir / "samples"


def sample(
    settings: Settings,
    name: str,
    prompts: list[str],
    num_images: int = 4,
    *,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int | None = None,
    batch_size: int = 4,
    negative_prompt: str = "",
    size: int | None = None,
    base: bool = False,
    lora: Path | None = None,
    lora_scale: float = 1.0,
    model_given: bool = False,
) -> dict:
    if not prompts:
        raise BadInput("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    if num_images < 1 or batch_size < 1 or steps < 1:
        raise BadInput("--num-images, --batch-size and --steps must be at least 1")
    if size is not None and (size < 8 or size % 8):
        raise BadInput(f"invalid --size {size}: must be a positive multiple of 8")
    if base and lora is not None:
        raise BadInput("--base and --lora cannot be combined")
    run_dir = run_folder(settings.project, name)
    model, lora_path, inputs, trained_size, folder = choose_model(settings, run_dir, name, base, lora, model_given)
    use = Settings(settings.project, model, settings.device, settings.dtype, settings.shard, settings.force)
    tokenizer = load_tokenizer(use)
    for prompt in prompts:
        check_prompt(tokenizer, prompt, f"prompt {prompt[:40]!r}")
    side = size or trained_size or native_resolution(use)
    seed = int(settings.project.get("seed", seed))
    count = len(prompts) * num_images
    ranges = chunk_ranges(count, batch_size)
    params = {
        "prompts": prompts, "num_images": num_images, "steps": steps, "guidance": guidance, "seed": seed,
        "batch_size": batch_size, "negative_prompt": negative_prompt, "size": side, "model": model.identity,
        "lora": lora_identity(lora_path) if lora_path else None, "lora_scale": lora_scale if lora_path else None,
        "dtype": settings.dtype_name,
    }
    run = StageRun(folder, "sample", params, inputs, len(ranges), force=settings.force, shard=settings.shard)
    extra = {"images": count, "model": model.spec, "lora": str(lora_path) if lora_path else None,
             "grid": str(folder / GRID)}
    if run.up_to_date() and not settings.force:
        return up_to_date_result(run, extra)

    def create() -> None:
        for stale in list(folder.glob("*.png")) + [folder / MANIFEST]:
            stale.unlink(missing_ok=True)

    pending = run.start(create)

    def load() -> None:
        pipe = use.pipeline()
        if lora_path is not None:
            apply_lora(pipe, lora_path, lora_scale)
            log.info(f"sample: LoRA {lora_path} at scale {lora_scale}")

    def work(unit: int, bar):
        start, end = ranges[unit]
        cells = [divmod(i, num_images) for i in range(start, end)]
        images = generate(use.pipeline(), [prompts[p] for p, _ in cells], [seed + j for _, j in cells], steps=steps,
                          guidance=guidance, width=side, height=side, negative_prompt=negative_prompt)
        for (p, j), image in zip(cells, images):
            write_png(folder / image_name(p, j), image, {"prompt": prompts[p], "seed": seed + j, "model": model.identity})
        return [images]

    def parts(unit: int) -> list[Part]:
        return [Part(image_name(*divmod(i, num_images))) for i in range(*ranges[unit])]

    computed = run_units(run, pending, work, "sample", on_start=load, parts=parts)

    def finalize() -> dict:
        from vfx.media import read_image

        entries = [{"file": image_name(p, j), "prompt": prompts[p], "prompt_index": p, "image_index": j,
                    "seed": seed + j} for p in range(len(prompts)) for j in range(num_images)]
        sheet = grid([read_image(folder / e["file"]) for e in entries], num_images)
        write_png(folder / GRID, sheet)
        atomic_write_json(folder / MANIFEST, {"model": model.spec, "model_identity": model.identity,
                                              "lora": str(lora_path) if lora_path else None, "lora_scale": lora_scale,
                                              "steps": steps, "guidance": guidance, "size": side, "images": entries})
        return {"images": count, "grid": GRID}

    return outcome(run, run.finish(finalize), computed, extra)

