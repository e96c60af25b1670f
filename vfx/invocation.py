"""The command line of this vfx process. Stage records keep it, so `vfx status` and the report print the
exact command that makes a stage again, with the options it was run with."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

_argv: list[str] | None = None

# Flags that applied to one run only: the command that brings a stage up to date leaves them out.
ONE_RUN_FLAGS = {"--force", "--json", "--debug"}
ONE_RUN_OPTIONS = {"--shard"}  # with a value


def remember(args) -> None:
    """The arguments after `vfx` of the command this process runs."""
    global _argv
    _argv = [str(arg) for arg in args]


def recorded() -> dict | None:
    """What a stage record keeps: the words after `vfx` and the directory they were given in."""
    return None if _argv is None else {"argv": list(_argv), "cwd": os.getcwd()}


def rerun_command(command: dict | None, root: Path, shown_root: str) -> str | None:
    """The recorded command as one shell line for project `root` (written as `shown_root`), without the
    flags that only applied to that run; None when the record keeps no command."""
    if not command or not isinstance(command.get("argv"), list):
        return None
    cwd = Path(command.get("cwd") or ".")
    words, skip = ["vfx"], False
    for word in command["argv"]:
        if skip:
            skip = False
        elif word in ONE_RUN_FLAGS or word.split("=")[0] in ONE_RUN_OPTIONS:
            skip = word in ONE_RUN_OPTIONS
        elif not word.startswith("-") and (cwd / word).resolve() == Path(root).resolve():
            words.append(shown_root)
        else:
            words.append(word)
    return " ".join(shlex.quote(word) for word in words)
