"""What the report shows, read from the project's records alone: the videos, the metrics, the stage
table with each stage's command, and what to run next."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from vfx import graph
from vfx.plot import eval_panels
from vfx.project import Project
from vfx.status import remake_command, stage_states

SOURCE_VIDEO = "source.mp4"  # written into the report folder from frames/frames.zarr


@dataclass
class Video:
    label: str
    path: Path  # absolute: in the project, or (the source) in the report folder
    frames: int
    fps: str
    command: str  # what makes it
    note: str = ""
    edit: str | None = None  # the edit's name (a contact sheet is made for each)


@dataclass
class Evaluation:
    name: str
    state: str
    command: str
    means: list[tuple[str, str]]
    panels: list[tuple[str, dict[str, list]]]


@dataclass
class Page:
    root: Path
    rows: list[dict]
    frames: int = 0  # the source's frame count (0: not extracted)
    fps: str | None = None
    videos: list[Video] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)

    @property
    def decoded(self) -> bool:
        return any(video.label != "source" for video in self.videos)

    @property
    def reconstructed(self) -> bool:
        """Whether the inversion was denoised back (its frames make a contact-sheet row)."""
        return any(video.label == "inversion" for video in self.videos)


def _done(row: dict | None) -> bool:
    return bool(row) and row["state"] in {"complete", "stale"}


def _means(summary: dict) -> list[tuple[str, str]]:
    means = []
    for metric, label in (("warp_error", "warp error ×1e-3"), ("clip_f", "CLIP-F")):
        for video, value in (summary.get(metric) or {}).items():
            means.append((f"{label} {video}", "n/a" if value is None else f"{value:.4g}"))
    for key, label in (("psnr_mean", "PSNR (dB)"), ("ssim_mean", "SSIM"), ("clip_t", "CLIP-T")):
        if summary.get(key) is not None:
            means.append((label, f"{summary[key]:.4g}"))
    return means


def collect(project: Project, folder: Path) -> Page:
    """The page of `project` for a report written into `folder`."""
    root = project.root
    shown_root = shlex.quote(str(root))
    rows = stage_states(project, shown_root=shown_root)
    for row in rows:
        found = graph.stage_of_folder(row["folder"])
        row["name"] = found[1] if found else None
        known = row["stage"] in graph.STAGES  # not an unreadable record
        row["command"] = (row.get("hint") or remake_command(row, root, shown_root)) if known else ""
        spec = graph.STAGES.get(row["stage"])
        recorded = [path for path in row.get("artifacts") or {} if (root / row["folder"] / path).exists()]
        paths = recorded if row["state"] != "missing" else [a.path for a in spec.artifacts] if spec else []
        row["artifact_keys"] = [graph.artifact_key(row["folder"], path) for path in paths]
    by_folder = {row["folder"]: row for row in rows}
    if by_folder["frames"]["state"] == "missing" and project.config.get("video"):
        by_folder["frames"]["command"] = f"vfx extract {shlex.quote(str(root))}"  # vfx.toml names the video
    page = Page(root, rows)

    frames = by_folder.get("frames")
    if _done(frames):
        page.frames, page.fps = int(frames["summary"]["frames"]), str(frames["summary"]["fps"])
        page.videos.append(Video("source", folder / SOURCE_VIDEO, page.frames, page.fps, frames["command"],
                                 "the extracted frames (frames/frames.zarr)"))

    def decoded_video(name: str) -> tuple[dict, Path] | None:
        row = by_folder.get(f"decoded/{name}")
        video = root / "decoded" / name / "video.mp4"
        return (row, video) if _done(row) and video.is_file() else None

    def note(row: dict, text: str) -> str:
        return text + (f" ({row['state']}: rerun its command)" if row["state"] != "complete" else "")

    found = decoded_video("source")
    if found:
        row, video = found
        page.videos.append(Video("reconstruction", video, row["summary"]["frames"], row["summary"]["fps"], row["command"],
                                 note(row, "the source latents decoded (decoded/source)")))
    inversion = by_folder.get("inversion")
    recon = root / "inversion" / "reconstruction.mp4"
    if _done(inversion) and inversion["params"].get("reconstruction") and recon.is_file() and page.fps:
        page.videos.append(Video("inversion", recon, inversion["summary"]["frames"], page.fps, inversion["command"],
                                 note(inversion, "DDIM inversion denoised back (inversion/reconstruction.mp4)")))
    edits = sorted(row["name"] for row in rows if row["stage"] == "edit" and row["name"])
    for name in edits:
        found = decoded_video(name)
        if found:
            row, video = found
            prompt = by_folder[f"edits/{name}"]["params"].get("prompt", "")
            page.videos.append(Video(name, video, row["summary"]["frames"], row["summary"]["fps"], row["command"],
                                     note(row, f"edit “{prompt}”"), edit=name))

    if not page.frames and page.videos:  # frames/ gone since: the first decoded video sets the scrubber
        page.frames, page.fps = page.videos[0].frames, page.videos[0].fps
    for row in rows:
        summary = row.get("summary") or {}
        if row["stage"] == "eval" and _done(row) and summary.get("per_frame"):
            page.evaluations.append(Evaluation(row["name"], row["state"], row["command"], _means(summary),
                                               eval_panels(summary)))
    page.next_steps = next_steps(root, rows, by_folder, edits)
    return page


def next_steps(root: Path, rows: list[dict], by_folder: dict[str, dict], edits: list[str]) -> list[str]:
    """Commands still to run, in pipeline order: missing, unfinished or stale stages, then decodes and
    evaluations of the edits."""
    quoted = shlex.quote(str(root))
    steps = [row["command"] for row in rows if row["state"] != "complete" and row["command"]]
    if not edits:
        steps.append(f"vfx edit {quoted} --name NAME --prompt '...'")
    if by_folder.get("decoded/source") is None:
        steps.append(f"vfx decode {quoted}")
    for name in edits:
        if by_folder.get(f"decoded/{name}") is None:
            steps.append(f"vfx decode {quoted} --edit {shlex.quote(name)}")
        elif by_folder.get(f"eval/{name}") is None:
            steps.append(f"vfx eval {quoted} --edit {shlex.quote(name)}")
    return list(dict.fromkeys(steps))
