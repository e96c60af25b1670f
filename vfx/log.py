"""Messages and progress bars go to stderr; stdout carries results only."""

from __future__ import annotations

import contextlib
import datetime
import os
import time
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
    """A handle on one progress display: advance it, change its phase text, show named values (e.g. the
    loss). This base shows nothing: --quiet, or nothing to do."""

    def advance(self, amount: float = 1) -> None:
        pass

    def phase(self, text: str) -> None:
        pass

    def values(self, **values: float | None) -> None:
        """Named numbers shown after the count (None: not shown)."""


def format_values(values: dict[str, float | None]) -> str:
    return " ".join(f"{name} {value:.4g}" for name, value in values.items() if value is not None)


class RichBar(Bar):
    """One task of a rich progress display (a terminal)."""

    def __init__(self, progress: Progress, task: int):
        self._progress, self._task = progress, task

    def advance(self, amount: float = 1) -> None:
        self._progress.advance(self._task, amount)

    def phase(self, text: str) -> None:
        self._progress.update(self._task, phase=text)

    def values(self, **values: float | None) -> None:
        self._progress.update(self._task, values=format_values(values))


class PlainBar(Bar):
    """Plain lines for a log file (no ANSI codes, no carriage returns): one at the start, then at most one
    every `interval` seconds as units are done, and one at the end."""

    def __init__(self, label: str, total: float, done: float, unit: str, interval: float):
        self.label, self.total, self.unit, self.interval = label, total, unit, interval
        self.done = self.first = done  # `first`: done before this process started (a resumed run)
        self.began = self.last = time.monotonic()
        self._phase, self._values = "", ""

    def advance(self, amount: float = 1) -> None:
        self.done += amount
        if time.monotonic() - self.last >= self.interval:
            self.emit()

    def phase(self, text: str) -> None:
        self._phase = text

    def values(self, **values: float | None) -> None:
        self._values = format_values(values)

    def emit(self, event: str = "") -> None:
        self.last = time.monotonic()
        print(self.line(self.last - self.began, event), file=err.file, flush=True)

    def line(self, elapsed: float, event: str = "") -> str:
        """`LABEL: DONE/TOTAL UNIT (P%) | rate R | eta T | elapsed T[ | values][ | phase][ | event]`."""
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        left = max(self.total - self.done, 0)
        fields = [f"{self.label}: {count(self.done)}/{count(self.total)} {self.unit} "
                  f"({int(100 * self.done / self.total)}%)",
                  f"rate {speed(rate, self.unit)}", f"eta {clock(left / rate) if rate > 0 else '-'}",
                  f"elapsed {clock(elapsed)}"]
        fields += [text for text in (self._values, self._phase, event) if text]
        return " | ".join(fields)


def count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def speed(rate: float, unit: str) -> str:
    """Units per second, or seconds per unit when slower than one a second."""
    if rate <= 0:
        return "-"
    if rate >= 1:
        return f"{rate:.3g} {unit}/s"
    return f"{1 / rate:.3g} s/{singular(unit)}"


def singular(unit: str) -> str:
    if unit.endswith(("ches", "shes", "sses", "xes")):
        return unit[:-2]
    return unit[:-1] if unit.endswith("s") else unit


def clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


INTERVAL_ENV = "VFX_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0
_interval_warned = False


def progress_interval() -> float:
    """Seconds between plain progress lines: VFX_PROGRESS_INTERVAL (0: a line per unit), else 30. An invalid
    value warns once and gives the default: a typo in a batch script should not stop a long job."""
    global _interval_warned
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value >= 0:  # False for nan too
        return value
    if not _interval_warned:
        _interval_warned = True
        warn(f"invalid {INTERVAL_ENV}={raw!r}: must be seconds >= 0; using {DEFAULT_INTERVAL:g}")
    return DEFAULT_INTERVAL


def live_terminal() -> bool:
    """Whether stderr can redraw a bar in place (a terminal that is not a dumb one)."""
    return err.is_terminal and not err.is_dumb_terminal


_display: Progress | None = None  # the display on screen, which bars opened meanwhile join


@contextlib.contextmanager
def progress(label: str, total: float, unit: str = "", done: float = 0) -> Iterator[Bar]:
    """Progress of `total` units on stderr, `done` of them finished before (a resumed run counts the whole
    run): a rich bar on a terminal, plain lines otherwise (nohup, SLURM, CI). Silent with --quiet or
    when nothing is left to do. A bar opened while another shows (the stages of `vfx run`) is one more line
    of that display."""
    global _display
    if _quiet or total <= done:
        yield Bar()
        return
    unit = unit or "units"
    if not live_terminal():
        bar = PlainBar(label, total, done, unit, progress_interval())
        bar.emit("start")
        try:
            yield bar
        except BaseException:
            bar.emit("stopped")  # by an error or a signal: the log shows how far it got
            raise
        bar.emit("end")
        return
    if _display is not None:
        task = _display.add_task(label, total=total, completed=done, phase="", values="", unit=unit)
        try:
            yield RichBar(_display, task)
        finally:
            _display.remove_task(task)  # the combined display keeps the overall line only
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TextColumn("{task.fields[values]}"),
        TextColumn("{task.fields[phase]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err, transient=False) as display:
        task = display.add_task(label, total=total, completed=done, phase="", values="", unit=unit)
        _display = display
        try:
            yield RichBar(display, task)
        finally:
            _display = None
