"""Messages and progress bars go to stderr; stdout carries results only."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

err = Console(stderr=True, highlight=False, soft_wrap=True)  # an error stays one line, however long
out = Console(highlight=False, soft_wrap=True)


def quiet_from_env() -> bool:
    return bool(os.environ.get("VFX_QUIET"))


_quiet = quiet_from_env()


def set_quiet(value: bool) -> None:
    global _quiet
    _quiet = value


def info(message: str) -> None:
    if not _quiet:
        err.print(message)


def note(message: str) -> None:
    if not _quiet:
        err.print(f"[yellow]note:[/yellow] {escape(message)}")


def warn(message: str) -> None:
    err.print(f"[bold yellow]warning:[/bold yellow] {escape(message)}")


def error(message: str) -> None:
    err.print(f"[bold red]error:[/bold red] {escape(message)}")


class Bar:
    """A thin handle on one progress task: advance it and change its phase text."""

    def __init__(self, progress: Progress | None, task: int | None):
        self._progress, self._task = progress, task

    def advance(self, amount: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, amount)

    def phase(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, phase=text)


@contextlib.contextmanager
def progress(label: str, total: int, unit: str = "") -> Iterator[Bar]:
    """A progress bar with count and ETA on stderr (silent with --quiet or when nothing to do)."""
    if _quiet or total <= 0:
        yield Bar(None, None)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TextColumn("{task.fields[phase]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(label, total=total, phase="")
        yield Bar(bar, task)
