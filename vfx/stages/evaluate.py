"""`vfx eval`: metrics of an edit or of the inversion, written to eval/<name>/ (warp error, PSNR/SSIM, CLIP scores).

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

from vfx import graph, log, metrics
from vfx.errors import BadInput, MissingStage
from vfx.fsutil import atomic_write_json, read_json
from vfx.project import Project, validate_name
from vfx.driver import Stage, drive
from vfx.stage import Part, Shard, StageFolder, StageRun, Upstream, is_complete, upstream
from vfx.store import chunk_ranges, open_array

FOLDER = "eval"
INVERSION = "inversion"  # eval/inversion/ holds `vfx eval --inversion`; no edit may take the name
SOURCE = graph.spec("decode").default_name  # decoded/source: the VAE round trip of the source (`vfx decode DIR`)
FLOW_ARRAYS = ("forward", "occlusion_forward")  # what warp errors read of flow/
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


def _decoded(project: Project, name: str) -> Upstream:
    """decoded/NAME/frames.zarr, or an error naming what to run first (the edit, then its decode)."""
    try:
        return upstream(project, "decode", "frames.zarr", name)
    except MissingStage:
        if name == SOURCE or StageFolder(project.path("edits", name)).is_complete():
            raise
    root = project.root
    raise BadInput(f"no edit named '{name}': run `vfx edit {root} --name {name} --prompt ...`, "
                   f"then `vfx decode {root} --edit {name}`")


def _reconstruction(project: Project) -> Upstream | None:
    """The inversion's reconstruction, when the invert stage is complete and made one."""
    record = StageFolder(project.path("inversion")).record()
    if not is_complete(record) or record.get("params", {}).get("reconstruction") is False:
        return None  # no inversion, or one run with --no-reconstruction
    try:
        return upstream(project, "invert", "reconstruction.zarr")
    except MissingStage:
        raise BadInput(f"{project.path('inversion')} is complete but has no reconstruction.zarr; "
                       f"rerun `vfx invert {project.root} --force`") from None


def _flow(project: Project, plan: Plan, required: bool) -> None:
    if not required and not StageFolder(project.path("flow")).is_complete():
        log.note(f"no flow/: warp errors skipped (run `vfx flow {project.root}` to get them)")
        return
    for name in FLOW_ARRAYS:
        found = upstream(project, "flow", f"{name}.zarr")
        plan.inputs.update(found.input())
    plan.warp = True
    plan.flow_params = {k: found.record["params"].get(k) for k in ("method", "preset", "occlusion")}


def _source(project: Project, plan: Plan) -> None:
    frames = upstream(project, "extract", "frames.zarr")
    plan.inputs.update(frames.input())
    plan.videos["source"] = open_array(project.path("frames", "frames.zarr"))


def plan_edit(project: Project, edit: str, prompt: str | None) -> Plan:
    validate_name(edit, "edit name")
    if edit == INVERSION:
        raise BadInput(f"'{INVERSION}' names the inversion's evaluation: use `vfx eval {project.root} --inversion`")
    decoded = _decoded(project, edit)
    plan = Plan(edit, "edit", inputs=decoded.input())
    plan.videos["edit"] = open_array(decoded.folder / "frames.zarr")
    _source(project, plan)
    _flow(project, plan, required=True)
    found = _reconstruction(project)
    if found:
        plan.inputs.update(found.input())
        plan.videos["reconstruction"] = open_array(found.folder / "reconstruction.zarr")
    if prompt is None:
        edit_record = StageFolder(project.path("edits", edit)).record() or {}
        prompt = edit_record.get("params", {}).get("prompt") if edit != SOURCE else project.config.get("prompt")
    plan.prompt = prompt or None
    return plan


def plan_inversion(project: Project, prompt: str | None) -> Plan:
    upstream(project, "extract", "frames.zarr")
    found = _reconstruction(project)
    if not found:
        raise MissingStage("invert", graph.spec("invert").command_for(project.root))
    plan = Plan(INVERSION, "reconstruction", inputs=found.input())
    plan.videos["reconstruction"] = open_array(found.folder / "reconstruction.zarr")
    _source(project, plan)
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
        from vfx.similarity import consecutive_cosines, cosines

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


class Evaluate(Stage):
    def __init__(self, project: Project, plan: Plan, clip, shard: Shard | None, force: bool):
        self.project, self.plan, self.clip = project, plan, clip
        self.label = f"eval {plan.name}"
        source = plan.videos["source"]
        for label, video in plan.videos.items():
            if video.shape != source.shape:
                raise BadInput(f"{label} frames are {list(video.shape)} but frames/ is {list(source.shape)}; "
                               "re-run the stage that made them on this project's frames")
        self.count = source.shape[0]
        self.ranges = chunk_ranges(self.count, source.chunks[0])
        params = {"target": plan.target, "videos": sorted(plan.videos), "warp": plan.warp, "psnr": plan.psnr,
                  "clip": clip.identity if clip else None, "prompt": plan.prompt if clip else None}
        self.run = StageRun(project.path(FOLDER, plan.name), "eval", params, plan.inputs, len(self.ranges),
                            force=force, shard=shard)
        self.parts_dir = self.run.path / "parts"

    def create(self) -> None:
        shutil.rmtree(self.parts_dir, ignore_errors=True)  # parts of an older, different evaluation
        self.parts_dir.mkdir(parents=True)

    def prepare(self) -> None:
        self.flow = {}
        if self.plan.warp:
            self.flow = {name: open_array(self.project.path("flow", f"{name}.zarr")) for name in FLOW_ARRAYS}

    def do_unit(self, unit: int, bar) -> None:
        start, end = self.ranges[unit]
        values = unit_values(self.plan, start, end, self.flow, self.clip)
        atomic_write_json(self.parts_dir / f"{unit:06d}.json", values)

    def parts(self, unit: int) -> list[Part]:
        return [Part(f"parts/{unit:06d}.json")]

    def finalize(self) -> dict:
        parts = [read_json(self.parts_dir / f"{unit:06d}.json") for unit in range(len(self.ranges))]
        if any(part is None for part in parts):
            raise BadInput(f"{self.parts_dir} is missing results; rerun with --force")
        return gather(self.plan, parts, self.count)

    def report(self, summary: dict) -> dict:
        return {"name": self.plan.name, "metrics": summary or None}


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
    clip = None
    if clip_path is not None:
        from vfx.similarity import Clip
        from vfx.runtime import resolve_device

        clip = Clip(clip_path, resolve_device(project.get("device", device)))
        if plan.prompt is None:
            log.note("CLIP-T skipped: no prompt (pass --prompt)")
    return drive(Evaluate(project, plan, clip, shard, force))
