"""Optical flow and metrics: flow, eval, eval-subject."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vfx import log
from vfx.cli import app
from vfx.cli.common import DeviceOpt, ForceOpt, JsonOpt, ProjectDir, ShardOpt, command, emit
from vfx.cli.common import report

ClipOpt = Annotated[
    Path | None,
    typer.Option("--clip", help="A CLIP model (transformers CLIPModel + tokenizer): a folder or a cached Hub id, e.g. openai/clip-vit-base-patch32; for CLIP-T/CLIP-F/CLIP-I.", show_default=False),
]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Also draw the per-frame curves into this PNG.", show_default=False)]


@command(app, "flow")
def flow_cmd(
    root: ProjectDir,
    preset: Annotated[str, typer.Option(help="OpenCV DIS preset: ultrafast | fast | medium.")] = "medium",
    shard: ShardOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Forward and backward optical flow between consecutive frames (OpenCV DIS) and occlusion masks, into flow/."""
    from vfx.project import Project
    from vfx.stage import Shard
    from vfx.stages.flow import compute_flow

    report(compute_flow(Project.open(root), preset, Shard.parse(shard), force), as_json)


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def eval_text(result: dict) -> str:
    """The human summary of an eval: the means, one metric per line."""
    summary = result.get("metrics")
    if not summary:
        return (f"eval: shard {result.get('shard')} done; {result.get('done_units')}/{result.get('units')} chunks "
                "complete overall (the last shard prints the metrics)")
    lines = [f"eval {summary['name']} ({summary['frames']} frames)" + (" - up to date" if result.get("up_to_date") else "")]
    if summary.get("warp_error"):
        flow = summary.get("flow") or {}
        errors = "  ".join(f"{label} {_fmt(value)}" for label, value in summary["warp_error"].items())
        lines.append(f"  warp error x1e-3: {errors}   (flow: {flow.get('method')} {flow.get('preset')} on the source)")
    if "psnr_mean" in summary:
        lines.append(f"  reconstruction PSNR {_fmt(summary['psnr_mean'], 2)} dB   SSIM {_fmt(summary['ssim_mean'], 4)}")
    if summary.get("clip_t") is not None:
        lines.append(f"  CLIP-T {_fmt(summary['clip_t'], 4)}   prompt: {summary.get('prompt')}")
    if summary.get("clip_f"):
        lines.append("  CLIP-F " + "  ".join(f"{label} {_fmt(value, 4)}" for label, value in summary["clip_f"].items()))
    return "\n".join(lines)


@command(app, "eval")
def eval_cmd(
    root: ProjectDir,
    edit: Annotated[str | None, typer.Option(help="Evaluate decoded/NAME (from `vfx decode DIR --edit NAME`; 'source' for the decoded source).", show_default=False)] = None,
    inversion: Annotated[bool, typer.Option("--inversion", help="Evaluate the inversion's reconstruction: PSNR and SSIM per frame (and warp error when flow/ exists).")] = False,
    clip: ClipOpt = None,
    prompt: Annotated[str | None, typer.Option(help="Prompt for CLIP-T. Default: the edit's prompt (the project prompt for the inversion).", show_default=False)] = None,
    plot: PlotOpt = None,
    device: DeviceOpt = None,
    shard: ShardOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Metrics of an edit (warp error with the source's flow, CLIP-T, CLIP-F) or of the inversion (PSNR, SSIM), into eval/NAME/."""
    from vfx.fsutil import output_file
    from vfx.project import Project
    from vfx.stage import Shard
    from vfx.stages.evaluate import evaluate

    if plot is not None:
        output_file(plot, "--plot", ".png")
    result = evaluate(Project.open(root), edit, inversion, prompt, clip, device, Shard.parse(shard), force)
    if plot is not None:
        if result.get("metrics"):
            from vfx.plot import eval_panels, plot_curves

            result["plot"] = str(plot_curves(plot, eval_panels(result["metrics"])))
        else:
            log.note("--plot: the evaluation is not complete yet; the last shard draws it")
    emit(result, as_json, eval_text(result))
    if result.get("plot") and not as_json:
        emit(result, False, f"plot: {result['plot']}")


@command(app, "eval-subject")
def eval_subject_cmd(
    samples: Annotated[Path, typer.Option(help="Folder of generated images (e.g. dreambooth/NAME/samples/...).", show_default=False)],
    real: Annotated[Path, typer.Option(help="Folder of real photos of the subject.", show_default=False)],
    prompt: Annotated[str | None, typer.Option(help="The samples' prompt for CLIP-T (write the class, not the rare token).", show_default=False)] = None,
    clip: ClipOpt = None,
    dino: Annotated[Path | None, typer.Option("--dino", help="A ViT/DINO model (transformers AutoModel): a folder or a cached Hub id, e.g. facebook/dino-vits16; for DINO.", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps.")] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """DreamBooth metrics of a folder of samples against real photos: CLIP-I, CLIP-T and DINO (mean cosines)."""
    from vfx.subject import eval_subject

    result = eval_subject(samples, real, prompt, clip, dino, device)
    parts = [f"{key.upper().replace('_', '-')} {result[key]:.4f}" for key in ("dino", "clip_i", "clip_t") if key in result]
    emit(result, as_json, f"{result['samples']} samples vs {result['real']} real: " + "  ".join(parts))
