"""Project-level commands: init, status, inspect, model, demo-video."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from vfx import log
from vfx.cli import app
from vfx.cli.common import JsonOpt, ProjectDir, command, emit
from vfx.errors import BadInput, VfxError
from vfx.project import EMPTY_PROMPT, Project

model_app = typer.Typer(help="The embedded tiny model and model helpers.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@command(app, "init")
def init_cmd(
    root: ProjectDir,
    video: Annotated[Path | None, typer.Option(help="A video file or image folder; `vfx extract` reads it.", show_default=False)] = None,
    model: Annotated[str | None, typer.Option(help="Default model for every stage.", show_default="tiny")] = None,
    size: Annotated[str | None, typer.Option(help="Default frame size: WxH (multiples of 8) or auto (the source's aspect ratio, short side the model's native size or the source's if smaller).", show_default="auto")] = None,
    fit: Annotated[str | None, typer.Option(help="Default way to reach a WxH size: cover | contain | stretch (see `vfx extract --help`).", show_default="cover")] = None,
    max_frames: Annotated[int | None, typer.Option(help="Default frame limit (0: all).", show_default="0")] = None,
    chunk_frames: Annotated[int | None, typer.Option(help="Frames per Zarr chunk = unit of work for shards.", show_default="8")] = None,
    prompt: Annotated[str | None, typer.Option(help="A description of the source video (the inversion prompt).", show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(help="Default seed.", show_default="0")] = None,
    steps: Annotated[int | None, typer.Option(help="The editing schedule: the steps `invert` saves (--save-steps) and `edit` denoises with (--steps).", show_default="50")] = None,
    device: Annotated[str | None, typer.Option(help="Default device.", show_default="auto")] = None,
    dtype: Annotated[str | None, typer.Option(help="Default dtype.", show_default="auto")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rewrite an existing vfx.toml.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a project directory and its vfx.toml (project defaults; flags override them per run)."""
    from vfx.fsutil import regular_file
    from vfx.media import FITS, parse_size
    from vfx.models import resolve_model

    if size is not None:
        parse_size(size)
    if fit is not None and fit not in FITS:
        raise BadInput(f"invalid --fit {fit!r}: use one of {', '.join(FITS)}")
    if video is not None:
        if not video.exists():
            raise BadInput(f"{video}: no such file or folder")
        if not video.is_dir():
            regular_file(video, "--video")
        video = video.resolve()
    if model is not None:
        resolve_model(model)
    if chunk_frames is not None and chunk_frames < 1:
        raise BadInput("--chunk-frames must be at least 1")
    if max_frames is not None and max_frames < 0:
        raise BadInput("--max-frames must be 0 (all frames) or more")
    if steps is not None and steps < 1:
        raise BadInput("--steps must be at least 1")
    overrides = {
        "model": model, "size": size, "fit": fit, "max_frames": max_frames, "chunk_frames": chunk_frames, "prompt": prompt,
        "seed": seed, "steps": steps, "device": device, "dtype": dtype, "video": str(video) if video else None,
    }
    project = Project.init(root, overrides, force=force)
    if not project.get("prompt"):
        log.warn(EMPTY_PROMPT)
    emit({"project": str(project.root), "config": project.config}, as_json, f"initialised {project.root / 'vfx.toml'}")


StageArg = Annotated[str, typer.Argument(help="encode | invert | flow | decode | eval | regularize | sample.", show_default=False)]
NameOpt = Annotated[
    str | None,
    typer.Option("--name", help="decode: the edit (default: source); eval: the edit or 'inversion'; regularize/sample: the run.",
                 show_default=False),
]
ImagesOpt = Annotated[
    int | None,
    typer.Option("--images", help="regularize: --num-images; sample: prompts x --num-images.", show_default=False),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="regularize/sample: images per unit (the stage's --batch-size).")]


@command(app, "plan")
def plan_cmd(
    root: ProjectDir,
    stage: StageArg,
    name: NameOpt = None,
    chunk_frames: Annotated[int | None, typer.Option("--chunk-frames", help="Plan for this chunk size instead of frames/'s.", show_default=False)] = None,
    per_shard: Annotated[int, typer.Option("--per-shard", help="Units (chunks or image groups) per array task.")] = 1,
    images: ImagesOpt = None,
    batch_size: BatchOpt = 4,
    as_json: JsonOpt = False,
) -> None:
    """Print how many shards (SLURM array tasks) a stage needs, before it runs: `--array=0-$((N-1))`."""
    from vfx.plan import Request, count_units, shard_count, stage_folder

    project = Project.open(root)
    request = Request(stage, name, chunk_frames, images, batch_size)
    stage_folder(project, request)  # checks the stage and the name
    units = count_units(project, request)
    shards = shard_count(units, per_shard)
    emit({"stage": stage, "units": units, "per_shard": per_shard, "shards": shards,
          "array": f"0-{shards - 1}"}, as_json, str(shards))


def missing_text(project: Project, request, shards: int | None, verify: bool) -> dict:
    """`status --missing`: the array indices of `shards` whose units are not done (or damaged)."""
    from vfx.plan import array_spec, count_units, missing_shards, recorded_units, stage_folder

    folder = stage_folder(project, request)
    units = recorded_units(folder) or count_units(project, request)
    count = units if shards is None else shards
    indices = missing_shards(folder, units, count, verify)
    return {"stage": request.stage, "folder": str(folder), "units": units, "shards": count,
            "missing": indices, "array": array_spec(indices)}


@command(app, "status")
def status_cmd(
    root: ProjectDir,
    verify: Annotated[bool, typer.Option("--verify", help="Read back every done chunk and check it against its checksum.")] = False,
    missing: Annotated[str | None, typer.Option("--missing", help="Print only the array indices of STAGE still to run, as `--array=` syntax.", show_default=False)] = None,
    shards: Annotated[int | None, typer.Option("--shards", help="With --missing: the array's task count (default: one per unit).", show_default=False)] = None,
    name: NameOpt = None,
    images: ImagesOpt = None,
    batch_size: BatchOpt = 4,
    as_json: JsonOpt = False,
) -> None:
    """Every stage: missing / partial (k of n chunks) / complete / stale / damaged, why, and the command that brings it up to date (with the options it was run with); parameters, outputs, sizes and timings. With --verify, exits 1 when anything is damaged."""
    from vfx.plan import Request
    from vfx.status import explain, human_bytes, stage_states

    project = Project.open(root)
    if missing is not None:
        result = missing_text(project, Request(missing, name, None, images, batch_size), shards, verify)
        emit(result, as_json, result["array"])
        return
    rows = stage_states(project, verify, shown_root=shlex.quote(str(root)))
    damaged = [row["folder"] for row in rows if row["state"] == "damaged"]
    if as_json:
        emit({"project": str(project.root), "stages": rows}, True)
    else:
        table = Table(title=f"vfx project {project.root}", title_justify="left", box=box.SIMPLE_HEAD)
        for column in ("folder", "stage", "state", "chunks", "size", "time"):
            table.add_column(column, no_wrap=True)
        colours = {"complete": "green", "partial": "yellow", "stale": "magenta", "missing": "dim", "damaged": "red"}
        for row in rows:
            state = row["state"]
            chunks = f"{row['done']}/{row['units']}" if row.get("units") else ""
            seconds = f"{row['seconds']:.1f}s" if row.get("seconds") is not None else ""
            size = human_bytes(row["bytes"]) if "bytes" in row else ""
            table.add_row(row["folder"], row["stage"], f"[{colours.get(state, 'white')}]{state}", chunks, size, seconds)
        log.out.print(table)
        for row in rows:
            log.out.print(escape("\n".join(explain(row))), soft_wrap=True)
    if verify and damaged:
        raise VfxError(f"damaged: {', '.join(damaged)}; run the commands above to repair them")


@command(app, "inspect")
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="A stage folder, a .zarr array or a .safetensors file.", show_default=False)],
    preview: Annotated[Path | None, typer.Option(help="Write a PNG contact sheet (frames; latents per channel; flow as colour).", show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print an artifact's shape, dtype, chunks and attributes; optionally a PNG contact sheet."""
    from vfx.fsutil import output_file
    from vfx.inspect import contact_sheet, find_arrays, inspect_path

    if preview is not None:
        output_file(preview, "--preview", ".png")
    result = inspect_path(path)
    if preview is not None:
        arrays = find_arrays(path)
        if not arrays:
            raise BadInput(f"{path} holds no array to preview")
        result["preview"] = str(contact_sheet(arrays[0], preview))
    if as_json:
        emit(result, True)
        return
    for name, info in result.get("arrays", {}).items():
        log.out.print(f"[bold]{name}[/bold]  shape={tuple(info['shape'])} dtype={info['dtype']} chunks={tuple(info['chunks'])}")
        for key, value in info["attrs"].items():
            log.out.print(f"  {key}: {json.dumps(value, default=str)[:200]}")
    for name, info in result.get("tensors", {}).items():
        log.out.print(f"{name}  shape={tuple(info['shape'])} dtype={info['dtype']}")
    if "record" in result:
        rec = result["record"]
        log.out.print(f"record: stage={rec.get('stage')} state={rec.get('state')} fingerprint={rec.get('fingerprint')}")
        log.out.print(f"  params: {json.dumps(rec.get('params', {}), default=str)}")
    if preview is not None:
        log.out.print(f"preview: {result['preview']}")


@command(model_app, "tiny")
def model_tiny_cmd(
    out: Annotated[Path | None, typer.Argument(help="Write the model here (default: the cache, built once).", show_default=False)] = None,
    variant: Annotated[str, typer.Option(help="tiny (SD 1.x-shaped, epsilon), tiny-v (SD 2.x-shaped, v-prediction), tiny-xl (SDXL-shaped) or tiny-depth (SD 2 depth-shaped).")] = "tiny",
    as_json: JsonOpt = False,
) -> None:
    """Build an embedded tiny model: SD 1.x-, SD 2.x-, SDXL- or SD 2 depth-shaped (deterministic: identical bytes every time)."""
    from vfx.models import TINY_NAMES, tiny_model_dir
    from vfx.tiny_models import build_tiny

    if variant not in TINY_NAMES:
        raise BadInput(f"unknown variant {variant!r}: use {', '.join(TINY_NAMES)}")
    if out is None:
        folder = tiny_model_dir(variant)
    else:
        if out.exists() and any(out.iterdir()):
            raise BadInput(f"{out} exists and is not empty; choose a new folder")
        folder = build_tiny(out, variant)
    emit({"model": str(folder), "variant": variant}, as_json, str(folder))


@command(model_app, "random")
def model_random_cmd(
    arch: Annotated[str, typer.Option("--arch", help="sd15 (SD 1.5), sd21 (SD 2.1, 768 px, v-prediction) or sdxl (SDXL base, 1024 px).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="The pipeline folder to write (refused if it exists, unless --force).", show_default=False)],
    dtype: Annotated[str, typer.Option("--dtype", help="fp16 | fp32: the saved weights' precision (fp16 halves the disk).")] = "fp16",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing model folder at --out.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a diffusers pipeline with a real architecture (SD 1.5, SD 2.1, SDXL) and random weights, for measuring speed and memory without downloads (deterministic: identical bytes every time)."""
    from vfx.random_models import write_random_model

    result = write_random_model(arch, out, dtype, force)
    total = sum(result["parameters"].values())
    emit(result, as_json, f"{out}: {arch} architecture, random {dtype} weights, {total / 1e6:.1f} M parameters")


MAX_DEMO_FRAMES, MAX_DEMO_SIZE = 100_000, 4096  # a test clip, not a way to fill the disk


@command(app, "demo-video")
def demo_video_cmd(
    out: Annotated[Path, typer.Argument(help="Where to write the .mp4.", show_default=False)],
    frames: Annotated[int, typer.Option(help="Number of frames.")] = 24,
    size: Annotated[int, typer.Option(help="Side of the square frames (pixels).")] = 128,
    fps: Annotated[int, typer.Option(help="Frame rate.")] = 12,
) -> None:
    """Write a small generated test clip (a textured disc moving over a gradient)."""
    from vfx.media import synthetic_video

    if not (1 <= frames <= MAX_DEMO_FRAMES and 16 <= size <= MAX_DEMO_SIZE and 1 <= fps <= 240):
        raise BadInput(f"need 1 <= --frames <= {MAX_DEMO_FRAMES}, 16 <= --size <= {MAX_DEMO_SIZE} and 1 <= --fps <= 240")
    if out.exists():
        raise BadInput(f"{out} exists; choose a new file name")
    synthetic_video(out, frames, size, fps)
    log.out.print(str(out))
