"""The project report: report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vfx.cli import app
from vfx.cli.common import JsonOpt, ProjectDir, command, emit


@command(app, "report")
def report_cmd(
    root: ProjectDir,
    out: Annotated[Path | None, typer.Option("--out", help="The page to write; its folder holds the report's own files. Default: DIR/report/index.html.", show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write one self-contained HTML page: source, reconstruction and edits side by side, contact sheets, metric plots, stages and their commands.

    The page needs no network: open it from disk (file://). Videos are referenced by relative paths into the project; the source frames are written beside the page as source.mp4, with a contact sheet per edit. The report folder is built aside and swapped in whole; a folder that is not a report is never replaced.
    """
    from vfx.project import Project
    from vfx.report import build_report

    result = build_report(Project.open(root), out)
    lines = [result["path"]]
    if result["next_steps"]:
        lines.append("next: " + result["next_steps"][0])
    emit(result, as_json, "\n".join(lines))
