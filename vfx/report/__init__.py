"""`vfx report`: one self-contained HTML page of a project: the source, its reconstruction and every
edit side by side, contact sheets, per-frame metric plots, and the stage table with the command that
makes each artifact."""

from vfx.report.build import build_report

__all__ = ["build_report"]
