"""Optical flow and metrics: flow."""

from __future__ import annotations

from typing import Annotated

import typer

from vfx.cli import app
from vfx.cli.common import ForceOpt, JsonOpt, ProjectDir, ShardOpt, command
from vfx.cli.video_cmds import report

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
