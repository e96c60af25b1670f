"""Running a command as a batch job would (stderr a pipe, not a terminal) and reading its progress lines."""

from __future__ import annotations

import re
import subprocess

from conftest import cli_env, vfx_command

# LABEL: DONE/TOTAL UNIT (P%) | rate R | eta T | elapsed T[ | more fields]
LINE = re.compile(
    r"^(?P<label>.+?): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\S+) \((?P<percent>\d+)%\)"
    r" \| rate (?P<rate>-|[\d.e+-]+ (?:\S+/s|s/\S+)) \| eta (?P<eta>-|\d+:\d\d:\d\d)"
    r" \| elapsed (?P<elapsed>\d+:\d\d:\d\d)(?P<rest>(?: \| .+)?)$"
)


def run_logged(*args, interval: str = "0", **env: str) -> subprocess.CompletedProcess:
    """`python -m vfx ARGS` with progress on, stderr a pipe; it must succeed."""
    environment = cli_env(VFX_QUIET="", VFX_PROGRESS_INTERVAL=interval, **env)
    for forced in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):  # would make rich draw a live bar
        environment.pop(forced, None)
    proc = subprocess.run(vfx_command(*args), capture_output=True, text=True, env=environment)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stderr and "\r" not in proc.stderr, repr(proc.stderr)
    return proc


def progress_lines(stderr: str, label: str) -> list[re.Match]:
    counted = re.compile(rf"^{re.escape(label)}: \d+/\d+ ")  # other messages of the stage name it too
    lines = [LINE.match(line) for line in stderr.splitlines() if counted.match(line)]
    assert lines and all(lines), stderr
    return lines


def counts(lines: list[re.Match]) -> list[tuple[int, int]]:
    return [(int(m["done"]), int(m["total"])) for m in lines]


def assert_start_and_end(lines: list[re.Match]) -> None:
    """The first line marks the start (no rate yet), the last the end (a rate and an ETA)."""
    assert lines[0]["rest"].endswith("| start") and lines[0]["rate"] == "-" and lines[0]["eta"] == "-"
    assert lines[-1]["rest"].endswith("| end") and lines[-1]["rate"] != "-" and lines[-1]["eta"] != "-"
    assert all(not m["rest"].endswith(("start", "end")) for m in lines[1:-1])


def invoke_logged(monkeypatch, *args, interval: str = "0") -> str:
    """The CLI in-process with progress on (click's captured stderr is no terminal either); its stderr."""
    from conftest import invoke
    from vfx import log

    monkeypatch.setenv("VFX_QUIET", "")
    monkeypatch.setenv("VFX_PROGRESS_INTERVAL", interval)
    monkeypatch.setattr(log, "_quiet", log._quiet)  # the CLI turns it off; the other tests get it back
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.stderr
