"""`vfx report`: build the report folder aside, then swap it in whole (vfx.fsutil.replace_path).

The folder holds the page, `report.json` (what it shows; it also marks the folder as a report, so
only a report folder is ever replaced), the source frames as `source.mp4` and a contact sheet per
edit. Everything else is referenced where it lies in the project, by relative paths.
"""

from __future__ import annotations

import os
import shutil
from fractions import Fraction
from pathlib import Path

from vfx.errors import BadInput
from vfx.fsutil import atomic_write_json, file_lock, output_file, replace_path
from vfx.project import Project
from vfx.report.assets import contact_sheet, sheet_indices, source_video
from vfx.report.collect import SOURCE_VIDEO, Page, collect
from vfx.report.page import relative_url, render
from vfx.stage import RECORD, upstream
from vfx.store import open_array

MANIFEST = "report.json"


def report_path(project: Project, out: Path | None) -> Path:
    """The page's path (default DIR/report/index.html), checked: an .html name, no symbolic link on the way
    from its folder, not inside a stage folder, and a folder that is new, empty or an earlier report."""
    out = Path(out) if out is not None else project.root / "report" / "index.html"
    output_file(out, "--out", ".html")
    if out.is_symlink():
        raise BadInput(f"--out {out} is a symbolic link; vfx does not write through links")
    folder = out.parent
    if folder.is_symlink():
        raise BadInput(f"{folder} is a symbolic link; give --out in a real folder")
    folder = folder.resolve() if folder.exists() else folder.parent.resolve() / folder.name
    for parent in [folder, *folder.parents]:
        if (parent / RECORD).exists():
            raise BadInput(f"--out {out} is inside the stage folder {parent}; write the report elsewhere")
    if folder.exists():
        if not folder.is_dir():
            raise BadInput(f"{folder} is not a folder")
        if any(folder.iterdir()) and not (folder / MANIFEST).is_file():
            raise BadInput(f"{folder} holds files and is no vfx report; give --out in a new or empty folder")
    return folder / out.name


def _remove_scratch(folder: Path) -> None:
    """Scratch folders of report builds that died (their process is gone)."""
    for scratch in folder.parent.glob(f".{folder.name}.partial-*"):
        pid = scratch.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(scratch, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_assets(project: Project, page: Page, scratch: Path) -> dict[str, tuple[str, list[int]]]:
    """source.mp4 and one contact sheet per decoded edit (source, the inversion's reconstruction when
    there is one, the edit), into `scratch`; returns the sheets."""
    sheets: dict[str, tuple[str, list[int]]] = {}
    if not any(video.label == "source" for video in page.videos):
        return sheets
    held = upstream(project, "extract", "frames.zarr")  # held steady while read
    frames = open_array(held.folder / "frames.zarr")
    source_video(frames, Fraction(page.fps), scratch / SOURCE_VIDEO)
    rows = [frames]
    if page.reconstructed:
        inversion = upstream(project, "invert", "reconstruction.zarr")
        rows.append(open_array(inversion.folder / "reconstruction.zarr"))
    for video in page.videos:
        if video.edit is None:
            continue
        decoded = upstream(project, "decode", "frames.zarr", video.edit)
        edit = open_array(decoded.folder / "frames.zarr")
        indices = sheet_indices(min(frames.shape[0], edit.shape[0]))
        name = f"sheet-{video.edit}.png"
        contact_sheet([*rows, edit], scratch / name, indices)
        sheets[video.edit] = (name, indices)
    return sheets


def _manifest(page: Page, folder: Path, out: Path, sheets: dict) -> dict:
    return {
        "report": "vfx", "page": out.name, "project": str(page.root), "frames": page.frames, "fps": page.fps,
        "videos": [{"label": v.label, "src": relative_url(v.path, folder), "frames": v.frames, "fps": v.fps,
                    "command": v.command} for v in page.videos],
        "sheets": {name: {"src": file, "frames": indices} for name, (file, indices) in sheets.items()},
        "evaluations": [item.name for item in page.evaluations],
        "next_steps": page.next_steps,
    }


def build_report(project: Project, out: Path | None = None) -> dict:
    """Write the report page of `project` (default DIR/report/index.html); returns report.json's content
    with the page's path."""
    out = report_path(project, out)
    folder = out.parent
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.parent / f".{folder.name}.lock"):
        _remove_scratch(folder)
        scratch = folder.parent / f".{folder.name}.partial-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        try:
            page = collect(project, folder)
            sheets = _write_assets(project, page, scratch)
            (scratch / out.name).write_text(render(page, folder, sheets), encoding="utf-8")
            manifest = _manifest(page, folder, out, sheets)
            atomic_write_json(scratch / MANIFEST, manifest)
            replace_path(scratch, folder)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return {**manifest, "path": str(out)}

