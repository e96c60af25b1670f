"""`vfx eval`: metrics of an edit or of the inversion, written to eval/<name>/ (DESIGN section 7).

Units are the frame chunks of frames/. Unit k computes the per-frame values of frames
[s, e) and the per-pair values of the pairs (t-1, t) for t in [s, e), writes them to
parts/<k>.json, and is marked done; the process that completes the last unit gathers the parts
into the record's summary. So eval shards like the other stages, and N shards give the same
numbers as one process.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vfx import log, metrics
from vfx.errors import BadInput, MissingStage
from vfx.fsutil import atomic_write_json, read_json
from vfx.project import Project, validate_name
from vfx.stage import Part, Shard, StageFolder, StageRun
from vfx.stages.common import outcome, run_units, up_to_date_result
from vfx.stages.flow import flow_upstream, frames_upstream
from vfx.store import chunk_ranges, open_array

FOLDER = "eval"
INVERSION = "inversion"  # eval/inversion/ holds `vfx eval --inversion`; no edit may take the name
SOURCE = "source"  # decoded/source: the VAE round trip of the source (`vfx decode DIR`)
WARP_UNIT = 1e-3  # warp errors are reported in units of 10^-3, as in the papers


@dataclass
class Plan:
    """What one eval computes: which videos, which metrics, and what it depends on."""

    name: str
    target: str  # label of the video under evaluation
    videos: dict = field(default_factory=dict)  # label -> zarr array [N, H, W, 3]
    inputs: dict = field(default_factory=dict)  # upstream folder -> fingerprint
    warp: bool = False
    psnr: bool = False  # target vs source, per frame (PSNR and SSIM)
    prompt: str | None = None
    flow_params: dict | None = None


def _decoded(project: Project, name: str) -> tuple[dict, Path]:
    folder = project.path("decoded", name)
    record = StageFolder(folder).record()
    if record and record.get("state") == "complete":
        return record, folder
    root = project.root
    if name == SOURCE:
        raise MissingStage("decode", f"vfx decode {root}")
    if not StageFolder(project.path("edits", name)).is_complete():
        raise BadInput(f"no edit named '{name}': run `vfx edit {root} --name {name} --prompt ...`, "
                       f"then `vfx decode {root} --edit {name}`")
    raise MissingStage("decode", f"vfx decode {root} --edit {name}")


def _reconstruction(project: Project) -> tuple[dict, object] | None:
    """The inversion's record and reconstruction array, when the invert stage is complete."""
    record = StageFolder(project.path("inversion")).record()
    path = project.path("inversion", "reconstruction.zarr")
    if not record or record.get("state") != "complete":
        return None
    if not (path / "zarr.json").is_file():
        raise BadInput(f"{project.path('inversion')} is complete but has no reconstruction.zarr; rerun `vfx invert {project.root} --force`")
    return record, open_array(path)


def _flow(project: Project, plan: Plan, required: bool) -> None:
    if not required and not StageFolder(project.path("flow")).is_complete():
        log.note(f"no flow/: warp errors skipped (run `vfx flow {project.root}` to get them)")
        return
    record = flow_upstream(project)
    plan.inputs["flow"] = record["fingerprint"]
    plan.warp = True
    plan.flow_params = {k: record["params"].get(k) for k in ("method", "preset", "occlusion")}


def plan_edit(project: Project, edit: str, prompt: str | None) -> Plan:
    validate_name(edit, "edit name")
    if edit == INVERSION:
        raise BadInput(f"'{INVERSION}' names the inversion's evaluation: use `vfx eval {project.root} --inversion`")
    record, folder = _decoded(project, edit)
    frames_record = frames_upstream(project)
    plan = Plan(edit, "edit", inputs={f"decoded/{edit}": record["fingerprint"], "frames": frames_record["fingerprint"]})
    plan.videos = {"edit": open_array(folder / "frames.zarr"), "source": open_array(project.path("frames", "frames.zarr"))}
    _flow(project, plan, required=True)
    found = _reconstruction(project)
    if found:
        plan.inputs["inversion"] = found[0]["fingerprint"]
        plan.videos["reconstruction"] = found[1]
    if prompt is None:
        edit_record = StageFolder(project.path("edits", edit)).record() or {}
        prompt = edit_record.get("params", {}).get("prompt") if edit != SOURCE else project.config.get("prompt")
    plan.prompt = prompt or None
    return plan


def plan_inversion(project: Project, prompt: str | None) -> Plan:
    frames_record = frames_upstream(project)
    found = _reconstruction(project)
    if not found:
        raise MissingStage("invert", f"vfx invert {project.root}")
    plan = Plan(INVERSION, "reconstruction", inputs={"inversion": found[0]["fingerprint"], "frames": frames_record["fingerprint"]})
    plan.videos = {"reconstruction": found[1], "source": open_array(project.path("frames", "frames.zarr"))}
    plan.psnr = True
    _flow(project, plan, required=False)
    plan.prompt = (prompt if prompt is not None else project.config.get("prompt")) or None
    return plan


# ---------------------------------------------------------------- computing


def unit_values(plan: Plan, start: int, end: int, flow: dict, clip) -> dict:
    """Per-frame values for frames [start, end); pair values are stored at the pair's later frame."""
    first = max(start - 1, 0)  # one frame of context for the pair that ends at `start`
    blocks = {label: np.asarray(video[first:end]) for label, video in plan.videos.items()}
    offset = start - first
    values: dict[str, list] = {}
    if plan.warp:
        pairs = range(max(start, 1), end)
        forward = np.asarray(flow["forward"][pairs.start - 1 : end - 1]) if pairs else None
        occluded = np.asarray(flow["occlusion_forward"][pairs.start - 1 : end - 1]) if pairs else None
        for label, block in blocks.items():
            column = [None] * (end - start)
            for i, t in enumerate(pairs):
                error = metrics.warp_error_pair(block[t - 1 - first], block[t - first], forward[i], occluded[i])
                column[t - start] = None if error is None else error / WARP_UNIT
            values[f"warp_error/{label}"] = column
    if plan.psnr:
        target, source = blocks[plan.target][offset:], blocks["source"][offset:]
        values["psnr"] = [metrics.psnr(a, b) for a, b in zip(target, source)]
        values["ssim"] = [metrics.ssim(a, b) for a, b in zip(target, source)]
    if clip is not None:
        from vfx.embeddings import consecutive_cosines, cosines

        text = clip.texts([plan.prompt]) if plan.prompt else None
        for label, block in blocks.items():
            embedded = clip.images(block)  # frames [first, end)
            values[f"clip_f/{label}"] = ([None] if start == 0 else []) + consecutive_cosines(embedded)
            if label == plan.target and text is not None:
                values["clip_t"] = cosines(embedded[offset:], text)[:, 0].tolist()
    return values


def gather(plan: Plan, parts: list[dict], count: int) -> dict:
    """The summary: means and per-frame lists (pair lists have N-1 entries: pair t-1 -> t at t-1)."""
    columns: dict[str, list] = {}
    for part in parts:
        for key, column in part.items():
            columns.setdefault(key, []).extend(column)
    summary: dict = {"name": plan.name, "target": plan.target, "frames": count, "prompt": plan.prompt,
                     "flow": plan.flow_params, "warp_error_unit": WARP_UNIT, "per_frame": {}}
    per_frame = summary["per_frame"]
    for key, column in sorted(columns.items()):
        metric, _, label = key.partition("/")
        pair = metric in {"warp_error", "clip_f"}
        values = column[1:] if pair else column
        mean = metrics.mean_defined(values)
        if label:
            summary.setdefault(metric, {})[label] = mean
            per_frame.setdefault(metric, {})[label] = values
        else:
            summary[f"{metric}_mean" if metric in {"psnr", "ssim"} else metric] = mean
            per_frame[metric] = values
    return summary


def evaluate(
    project: Project,
    edit: str | None = None,
    inversion: bool = False,
    prompt: str | None = None,
    clip_path: Path | None = None,
    device: str | None = None,
    shard: Shard | None = None,
    force: bool = False,
) -> dict:
    if (edit is None) == (not inversion):
        raise BadInput("pass either --edit NAME (an edit, or 'source') or --inversion")
    plan = plan_edit(project, edit, prompt) if edit is not None else plan_inversion(project, prompt)
    source = plan.videos["source"]
    for label, video in plan.videos.items():
        if video.shape != source.shape:
            raise BadInput(f"{label} frames are {list(video.shape)} but frames/ is {list(source.shape)}; "
                           "re-run the stage that made them on this project's frames")
    count = source.shape[0]
    ranges = chunk_ranges(count, source.chunks[0])
    clip = None
    if clip_path is not None:
        from vfx.embeddings import Clip
        from vfx.runtime import resolve_device

        clip = Clip(clip_path, resolve_device(project.get("device", device)))
        if plan.prompt is None:
            log.note("CLIP-T skipped: no prompt (pass --prompt)")
    params = {"target": plan.target, "videos": sorted(plan.videos), "warp": plan.warp, "psnr": plan.psnr,
              "clip": clip.identity if clip else None, "prompt": plan.prompt if clip else None}
    run = StageRun(project.path(FOLDER, plan.name), "eval", params, plan.inputs, len(ranges), force=force, shard=shard)
    if run.up_to_date() and not force:
        return up_to_date_result(run, {"name": plan.name, "metrics": run.folder.record()["summary"]})
    parts_dir = run.path / "parts"

    def create() -> None:
        shutil.rmtree(parts_dir, ignore_errors=True)  # parts of an older, different evaluation
        parts_dir.mkdir(parents=True)

    pending = run.start(create)
    flow = {}
    if plan.warp:
        flow = {name: open_array(project.path("flow", f"{name}.zarr")) for name in ("forward", "occlusion_forward")}

    def work(unit: int, bar) -> list[np.ndarray]:
        start, end = ranges[unit]
        values = unit_values(plan, start, end, flow, clip)
        atomic_write_json(parts_dir / f"{unit:06d}.json", values)
        return [np.array([np.nan if v is None else v for key in sorted(values) for v in values[key]], np.float64)]

    def finalize() -> dict:
        parts = [read_json(parts_dir / f"{unit:06d}.json") for unit in range(len(ranges))]
        if any(part is None for part in parts):
            raise BadInput(f"{parts_dir} is missing results; rerun with --force")
        return gather(plan, parts, count)

    def parts(unit: int) -> list[Part]:
        return [Part(f"parts/{unit:06d}.json")]

    computed = run_units(run, pending, work, f"eval {plan.name}", parts=parts)
    complete = run.finish(finalize)
    summary = run.folder.record()["summary"] if complete else None
    return outcome(run, complete, computed, {"name": plan.name, "metrics": summary})
