"""`vfx run`: the whole edit of a clip in one command, as the ordinary stages one after another."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vfx import log
from vfx.cli import app
from vfx.cli.common import DeviceOpt, DtypeOpt, ModelOpt, ProjectDir, command
from vfx.errors import BadInput

RunStage = tuple[str, list[str]]


def stage_commands(root: str, name: str, prompt: str, video: str | None, steps: int | None,
                   source_prompt: str | None, model_flags: list[str], seed: int | None,
                   depth: bool = False) -> list[RunStage]:
    """The command line (after `vfx`) of each stage `vfx run` drives, in order (`depth`: the model reads
    depth maps, so `vfx depth` runs before the inversion)."""
    schedule = ["--steps", str(steps)] if steps is not None else []
    invert = ["invert", root, *model_flags]
    invert += (["--save-steps", str(steps)] if steps is not None else [])
    invert += ["--prompt", source_prompt] if source_prompt is not None else []
    edit = ["edit", root, "--name", name, "--prompt", prompt, *schedule, *model_flags]
    edit += ["--seed", str(seed)] if seed is not None else []
    return [
        ("extract", ["extract", root, *([video] if video else [])]),
        ("encode", ["encode", root, *model_flags]),
        ("decode", ["decode", root, *model_flags]),  # the VAE's round trip: the report's baseline
        *([("depth", ["depth", root, *model_flags])] if depth else []),
        ("invert", invert),
        ("flow", ["flow", root]),
        ("edit", edit),
        ("decode", ["decode", root, "--edit", name, *model_flags]),
        ("eval", ["eval", root, "--edit", name]),
        ("report", ["report", root]),
    ]


def run_command_line(argv: list[str]) -> None:
    """Run one vfx command in this process, as if typed; its failure (already reported) ends `vfx run`
    with the same exit code, and rerunning `vfx run` continues from there."""
    code = typer.main.get_command(app).main(args=argv, prog_name="vfx", standalone_mode=False)
    if code not in (None, 0):
        raise typer.Exit(code)


def reads_depth(root: Path, model: str | None) -> bool:
    """Whether the run's model (--model, else the project's) is a depth model."""
    from vfx import models
    from vfx.project import CONFIG_NAME, Project

    if model is None and (root / CONFIG_NAME).is_file():
        model = Project.open(root).config.get("model")
    return models.reads_depth(model)


def check_options_early(video: Path | None, model: str | None, device: str | None, dtype: str | None,
                        size: str | None) -> None:
    """Refuse what a later stage would refuse, before any stage runs."""
    from vfx.fsutil import regular_file
    from vfx.media import parse_size
    from vfx.models import resolve_model
    from vfx.runtime import resolve_device, resolve_dtype

    if video is not None:
        if not video.exists():
            raise BadInput(f"{video}: no such file or folder")
        if not video.is_dir():
            regular_file(video, "the video")
    if model is not None:
        resolve_model(model)
    resolve_dtype(dtype, resolve_device(device))
    if size is not None:
        parse_size(size)


@command(app, "run")
def run_cmd(
    root: ProjectDir,
    video: Annotated[Path | None, typer.Argument(help="The video (or image folder) to edit; the same as --video. Needed when DIR is not a project yet.", show_default=False)] = None,
    video_option: Annotated[Path | None, typer.Option("--video", help="The video, as an option.", show_default=False)] = None,
    prompt: Annotated[str, typer.Option(help="The edited video's description.", show_default=False)] = "",
    name: Annotated[str | None, typer.Option(help="Edit name (edits/NAME). Default: derived from the prompt.", show_default=False)] = None,
    source_prompt: Annotated[str | None, typer.Option(help="A description of the source video (the inversion prompt). Default: vfx.toml's prompt.", show_default=False)] = None,
    steps: Annotated[int | None, typer.Option(help="The editing schedule: the steps the inversion saves and the edit denoises with. Default: vfx.toml's steps (50).", show_default=False)] = None,
    size: Annotated[str | None, typer.Option(help="Frame size: WxH or auto (see `vfx extract --help`). Default: vfx.toml (auto); a new project records it.", show_default=False)] = None,
    max_frames: Annotated[int | None, typer.Option(help="Keep at most N frames (0: all). Default: vfx.toml (0); a new project records it.", show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the edit's keyframe draws. Default: vfx.toml (0).", show_default=False)] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Edit a clip with one command: extract → encode → decode → invert → flow → edit → decode → eval → report (and depth before invert for a depth model).

    Each is the ordinary stage, with the project's vfx.toml defaults: a rerun after a crash continues
    where it stopped, and a changed option recomputes only the stages it affects. DIR is initialised
    (`vfx init`) when it holds no project yet. Prints the path of the report at the end.
    """
    from vfx.project import CONFIG_NAME, slugify, validate_name

    if video is not None and video_option is not None and video.resolve() != video_option.resolve():
        raise BadInput(f"two videos given ({video} as VIDEO, {video_option} as --video); pass one")
    if not prompt.strip():
        raise BadInput("--prompt is required: describe the edited video, e.g. --prompt 'a marble statue running'")
    if steps is not None and steps < 1:
        raise BadInput(f"invalid --steps {steps}: must be at least 1")
    if max_frames is not None and max_frames < 0:
        raise BadInput(f"invalid --max-frames {max_frames}: must be 0 (all frames) or more")
    video = video or video_option
    check_options_early(video, model, device, dtype, size)
    name = validate_name(name or slugify(prompt), "edit name")
    model_flags = [flag for option, value in (("--model", model), ("--device", device), ("--dtype", dtype))
                   if value is not None for flag in (option, value)]
    commands = stage_commands(str(root), name, prompt, str(video) if video else None, steps, source_prompt,
                              model_flags, seed, reads_depth(root, model))
    for option, value in (("--size", size), ("--max-frames", max_frames)):  # like any flag: for this run
        commands[0][1].extend([option, str(value)] if value is not None else [])
    if not (root / CONFIG_NAME).is_file():
        if video is None:
            raise BadInput(f"{root} is not a vfx project yet: pass the video to edit (vfx run {root} VIDEO --prompt ...)")
        init = ["init", str(root), "--video", str(video), *(["--model", model] if model is not None else [])]
        for option, value in (("--prompt", source_prompt), ("--size", size), ("--max-frames", max_frames),
                              ("--steps", steps)):
            init += [option, str(value)] if value is not None else []
        commands.insert(0, ("init", init))
    with log.progress("run", len(commands), "stages") as overall:
        for stage, argv in commands:
            overall.phase(stage)
            run_command_line(argv)
            overall.advance()
    log.out.print(f"report: {root / 'report' / 'index.html'}")
