"""Render docs/commands.md from the CLI itself, so the reference never drifts from `--help`.

Usage: python scripts/command_reference.py > docs/commands.md
"""

from __future__ import annotations

import click
import typer.main

from vfx.cli import app


def _default(param: click.Parameter) -> str:
    shown = getattr(param, "show_default", None)
    if isinstance(shown, str):
        return shown
    if param.param_type_name == "argument" or param.default is None or shown is False:
        return ""
    if isinstance(param.default, bool):
        return "on" if param.default else "off"
    return str(param.default)


def _rows(command: click.Command) -> list[str]:
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for param in command.params:
        if param.name == "help":
            continue
        names = ", ".join(param.opts + (param.secondary_opts if isinstance(param, click.Option) else []))
        if param.param_type_name == "argument":
            names = param.name.upper()
        text = (getattr(param, "help", "") or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{names}` | {_default(param).replace('|', '/')} | {text} |")
    return rows


def render() -> str:
    root = typer.main.get_command(app)
    lines = ["# Command reference", "", "Generated from the CLI by `scripts/command_reference.py`; `vfx COMMAND --help` shows the same.", ""]
    lines += ["Global options (before the command): `--debug` (tracebacks), `-q/--quiet` (no progress or notes; also `VFX_QUIET=1`), `--version`. When stderr is not a terminal, progress is plain lines every `VFX_PROGRESS_INTERVAL` seconds (default 30; docs/cluster.md).", ""]
    for name, command in root.commands.items():
        subcommands = command.commands.items() if hasattr(command, "commands") else [(None, command)]  # typer may carry its own click
        for sub, cmd in subcommands:
            full = f"vfx {name}" + (f" {sub}" if sub else "")
            lines += [f"## `{full}`", "", (cmd.help or "").strip().split("\n")[0], ""]
            lines += _rows(cmd) + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
