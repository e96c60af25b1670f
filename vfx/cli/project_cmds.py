"""Project-level commands: init, status, inspect, model, demo-video."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vfx import log
from vfx.cli import app
from vfx.cli.common import JsonOpt, ProjectDir, command, emit
from vfx.errors import BadInput
from vfx.project import Project

model_app = typer.Typer(help="The embedded tiny model and model helpers.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@command(app, "init")
def init_cmd(
    root: ProjectDir,
    video: Annotated[Path | None, typer.Option(help="A video file or image folder; `vfx extract` reads it.", show_default=False)] = None,
    model: Annotated[str | None, typer.Option(help="Default model for every stage.", show_default="tiny")] = None,
    size: Annotated[str | None, typer.Option(help="Default frame size WxH (multiples of 8).", show_default="512x512")] = None,
    max_frames: Annotated[int | None, typer.Option(help="Default frame limit (0: all).", show_default="0")] = None,
    chunk_frames: Annotated[int | None, typer.Option(help="Frames per Zarr chunk = unit of work for shards.", show_default="8")] = None,
    prompt: Annotated[str | None, typer.Option(help="A description of the source video (the inversion prompt).", show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(help="Default seed.", show_default="0")] = None,
    device: Annotated[str | None, typer.Option(help="Default device.", show_default="auto")] = None,
    dtype: Annotated[str | None, typer.Option(help="Default dtype.", show_default="auto")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rewrite an existing vfx.toml.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a project directory and its vfx.toml (project defaults; flags override them per run)."""
    from vfx.media import parse_size
    from vfx.models import resolve_model

    if size is not None:
        parse_size(size)
    if video is not None:
        if not video.exists():
            raise BadInput(f"{video}: no such file or folder")
        video = video.resolve()
    if model is not None:
        resolve_model(model)
    if chunk_frames is not None and chunk_frames < 1:
        raise BadInput("--chunk-frames must be at least 1")
    overrides = {
        "model": model, "size": size, "max_frames": max_frames, "chunk_frames": chunk_frames, "prompt": prompt,
        "seed": seed, "device": device, "dtype": dtype, "video": str(video) if video else None,
    }
    project = Project.init(root, overrides, force=force)
    emit({"project": str(project.root), "config": project.config}, as_json, f"initialised {project.root / 'vfx.toml'}")


@command(app, "status")
def status_cmd(root: ProjectDir, as_json: JsonOpt = False) -> None:
    """Every stage: missing / partial (k of n chunks) / complete / stale, with parameters, sizes and timings."""
    from vfx.status import human_bytes, key_params, stage_states

    project = Project.open(root)
    rows = stage_states(project)
    if as_json:
        emit({"project": str(project.root), "stages": rows}, True)
        return
    table = Table(title=f"vfx project {project.root}", title_justify="left", expand=True)
    for column in ("folder", "stage", "state", "chunks", "size", "time"):
        table.add_column(column, no_wrap=True)
    table.add_column("parameters", overflow="fold", ratio=1)
    colours = {"complete": "green", "partial": "yellow", "stale": "magenta", "missing": "dim", "damaged": "red"}
    for row in rows:
        state = row["state"]
        chunks = f"{row['done']}/{row['units']}" if row.get("units") else ""
        seconds = f"{row['seconds']:.1f}s" if row.get("seconds") is not None else ""
        params = key_params(row.get("params", {})) if state != "missing" else row.get("hint", "")
        size = human_bytes(row["bytes"]) if "bytes" in row else ""
        table.add_row(row["folder"], row["stage"], f"[{colours.get(state, 'white')}]{state}", chunks, size, seconds, params)
    log.out.print(table)


@command(app, "inspect")
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="A stage folder, a .zarr array or a .safetensors file.", show_default=False)],
    preview: Annotated[Path | None, typer.Option(help="Write a PNG contact sheet (frames; latents per channel; flow as colour).", show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print an artifact's shape, dtype, chunks and attributes; optionally a PNG contact sheet."""
    from vfx.inspect import contact_sheet, find_arrays, inspect_path

    result = inspect_path(path)
    if preview is not None:
        arrays = find_arrays(path)
        if not arrays:
            raise BadInput(f"{path} holds no array to preview")
        if preview.exists() and preview.is_dir():
            raise BadInput(f"--preview {preview} is a folder; give a .png file name")
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
    variant: Annotated[str, typer.Option(help="tiny (SD 1.x-shaped, epsilon) or tiny-v (SD 2.x-shaped, v-prediction).")] = "tiny",
    as_json: JsonOpt = False,
) -> None:
    """Build the embedded tiny SD-shaped model (deterministic: identical bytes every time)."""
    from vfx.models import TINY_NAMES, build_tiny, tiny_model_dir

    if variant not in TINY_NAMES:
        raise BadInput(f"unknown variant {variant!r}: use {' or '.join(TINY_NAMES)}")
    if out is None:
        folder = tiny_model_dir(variant)
    else:
        if out.exists() and any(out.iterdir()):
            raise BadInput(f"{out} exists and is not empty; choose a new folder")
        folder = build_tiny(out, variant)
    emit({"model": str(folder), "variant": variant}, as_json, str(folder))


@command(app, "demo-video")
def demo_video_cmd(
    out: Annotated[Path, typer.Argument(help="Where to write the .mp4.", show_default=False)],
    frames: Annotated[int, typer.Option(help="Number of frames.")] = 24,
    size: Annotated[int, typer.Option(help="Side of the square frames (pixels).")] = 128,
    fps: Annotated[int, typer.Option(help="Frame rate.")] = 12,
) -> None:
    """Write a small generated test clip (a textured disc moving over a gradient)."""
    from vfx.media import synthetic_video

    if frames < 1 or size < 16 or fps < 1:
        raise BadInput("need --frames >= 1, --size >= 16 and --fps >= 1")
    if out.exists():
        raise BadInput(f"{out} exists; choose a new file name")
    synthetic_video(out, frames, size, fps)
    log.out.print(str(out))
