"""`vfx sample`: images from a DreamBooth run (trained full weights, or base + LoRA) or the base model.

Image j of prompt p uses seed + j, so every column of the grid compares prompts from the same starting
noise. Units of work are fixed groups of `batch_size` images, so shards never change an image's bytes.
"""

from __future__ import annotations

from pathlib import Path

from vfx import log
from vfx.errors import BadInput
from vfx.fsutil import atomic_write_json, read_json, regular_file
from vfx.models import resolve_model
from vfx.diffusion.lora import apply_lora, lora_file, lora_identity
from vfx.driver import Stage, drive
from vfx.settings import Settings
from vfx.stage import Part, StageRun
from vfx.dreambooth.data import check_prompt, refuse_depth_model, run_folder
from vfx.dreambooth.images import generate, grid, native_resolution, write_png
from vfx.store import chunk_ranges
from vfx.dreambooth.tokens import load_tokenizer
from vfx.dreambooth.weights import INFO_FILE, trained_weights

MANIFEST = "manifest.json"
GRID = "grid.png"


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    regular_file(path, "--prompts-file")
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


def choose_model(settings: Settings, run_dir: Path, name: str, base: bool, lora: Path | None, model_given: bool,
                 allow_pickle: bool):
    """(the settings to sample with, LoRA file or None, upstream inputs, default size, output folder)."""
    if base:
        # The run's own base model, unless --model names another.
        info = read_json(run_dir / "weights" / INFO_FILE) or {}
        use = settings if model_given or not info else run_base(settings, info, allow_pickle)
        return use, None, {}, info.get("resolution"), run_dir / "samples-base"
    if lora is not None:
        return settings, lora_file(lora), {}, None, run_dir / "samples"
    weights = trained_weights(settings.project, name)
    inputs = weights.input()
    size = weights.info.get("resolution")
    if weights.mode == "full":
        return settings.with_model(resolve_model(str(weights.folder)), None), None, inputs, size, run_dir / "samples"
    use = run_base(settings, weights.info, allow_pickle)
    if use.model.identity != weights.base_identity:
        raise BadInput(f"the base model {weights.base_spec} changed since this LoRA was trained "
                       f"(identity {use.model.identity}, trained on {weights.base_identity})")
    return use, weights.lora, inputs, size, run_dir / "samples"


def run_base(settings: Settings, info: dict, allow_pickle: bool) -> Settings:
    """The base model a run was trained on, with the --model-config it was trained with (a single file's
    architecture) unless this command gives one; a pickled base still needs --allow-pickle here."""
    model = resolve_model(info["base_model_spec"], allow_pickle=allow_pickle)
    return settings.with_model(model, settings.model_config or info.get("base_model_config"))


class Sample(Stage):
    label = "sample"
    unit_name = "batches"  # of --batch-size images

    def __init__(self, settings: Settings, name: str, prompts: list[str], num_images: int, steps: int,
                 guidance: float, seed: int | None, batch_size: int, negative_prompt: str, size: int | None,
                 base: bool, lora: Path | None, lora_scale: float, model_given: bool, allow_pickle: bool = False):
        if not prompts:
            raise BadInput("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
        if num_images < 1 or batch_size < 1 or steps < 1:
            raise BadInput("--num-images, --batch-size and --steps must be at least 1")
        if size is not None and (size < 8 or size % 8):
            raise BadInput(f"invalid --size {size}: must be a positive multiple of 8")
        if base and lora is not None:
            raise BadInput("--base and --lora cannot be combined")
        run_dir = run_folder(settings.project, name)
        self.use, self.lora_path, inputs, trained_size, self.folder = choose_model(settings, run_dir, name, base, lora,
                                                                                   model_given, allow_pickle)
        refuse_depth_model(self.use)
        self.model, self.lora_scale, self.prompts, self.num_images = self.use.model, lora_scale, prompts, num_images
        tokenizer = load_tokenizer(self.use)
        for prompt in prompts:
            check_prompt(tokenizer, prompt, f"prompt {prompt[:40]!r}")
        self.side = size or trained_size or native_resolution(self.use)
        self.seed = int(settings.project.get("seed", seed))
        self.ranges = chunk_ranges(len(prompts) * num_images, batch_size)
        self.params = {
            "prompts": prompts, "num_images": num_images, "steps": steps, "guidance": guidance, "seed": self.seed,
            "batch_size": batch_size, "negative_prompt": negative_prompt, "size": self.side, "model": self.model.identity,
            "lora": lora_identity(self.lora_path) if self.lora_path else None,
            "lora_scale": lora_scale if self.lora_path else None, "dtype": settings.dtype_name,
        }
        self.run = StageRun(self.folder, "sample", self.params, inputs, len(self.ranges), force=settings.force,
                            shard=settings.shard)

    def prepare(self) -> None:
        self.pipe = self.use.pipeline()
        if self.lora_path is not None:
            apply_lora(self.pipe, self.lora_path, self.lora_scale)
            log.info(f"sample: LoRA {self.lora_path} at scale {self.lora_scale}")

    def create(self) -> None:
        for stale in list(self.folder.glob("*.png")) + [self.folder / MANIFEST]:
            stale.unlink(missing_ok=True)

    def cells(self, unit: int) -> list[tuple[int, int]]:
        """(prompt index, image index) of each image of `unit`."""
        return [divmod(i, self.num_images) for i in range(*self.ranges[unit])]

    def do_unit(self, unit: int, bar) -> None:
        p, cells = self.params, self.cells(unit)
        images = generate(self.pipe, [self.prompts[i] for i, _ in cells], [self.seed + j for _, j in cells],
                          steps=p["steps"], guidance=p["guidance"], width=self.side, height=self.side,
                          negative_prompt=p["negative_prompt"])
        for (i, j), image in zip(cells, images):
            write_png(self.folder / image_name(i, j), image,
                      {"prompt": self.prompts[i], "seed": self.seed + j, "model": self.model.identity})

    def parts(self, unit: int) -> list[Part]:
        return [Part(image_name(*cell)) for cell in self.cells(unit)]

    def finalize(self) -> dict:
        from vfx.media import read_image

        p, count = self.params, len(self.prompts) * self.num_images
        entries = [{"file": image_name(i, j), "prompt": self.prompts[i], "prompt_index": i, "image_index": j,
                    "seed": self.seed + j} for i in range(len(self.prompts)) for j in range(self.num_images)]
        sheet = grid([read_image(self.folder / e["file"]) for e in entries], self.num_images)
        write_png(self.folder / GRID, sheet)
        lora = str(self.lora_path) if self.lora_path else None
        atomic_write_json(self.folder / MANIFEST, {
            "model": self.model.spec, "model_identity": self.model.identity, "lora": lora,
            "lora_scale": self.lora_scale, "steps": p["steps"], "guidance": p["guidance"], "size": self.side,
            "images": entries})
        return {"images": count, "grid": GRID}

    def report(self, summary: dict) -> dict:
        return {"images": len(self.prompts) * self.num_images, "model": self.model.spec,
                "lora": str(self.lora_path) if self.lora_path else None, "grid": str(self.folder / GRID)}


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
    allow_pickle: bool = False,
) -> dict:
    return drive(Sample(settings, name, prompts, num_images, steps, guidance, seed, batch_size, negative_prompt,
                        size, base, lora, lora_scale, model_given, allow_pickle))
