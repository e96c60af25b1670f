"""Progress that survives a log file: plain lines when stderr is not a terminal, counted over the whole run."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from conftest import done_markers, ok, video_project
from dreambooth_helpers import make_project
from progress_helpers import LINE, assert_start_and_end, counts, invoke_logged, progress_lines, run_logged
from vfx import log


def test_a_line_per_unit_with_interval_0_and_only_start_and_end_with_a_long_one(tmp_path, gen_video):
    root = video_project(tmp_path / "p", gen_video, "--size", "64x64", "--chunk-frames", "4", stages=())
    lines = progress_lines(run_logged("extract", root, interval="0").stderr, "extract")
    assert counts(lines) == [(0, 12)] + [(k, 12) for k in range(1, 13)] + [(12, 12)]
    assert_start_and_end(lines)
    assert {m["unit"] for m in lines} == {"frames"} and lines[6]["percent"] == "50"

    lines = progress_lines(run_logged("flow", root, "--preset", "ultrafast", interval="100000").stderr,
                           "flow (ultrafast)")
    chunks = done_markers(root / "flow")
    assert counts(lines) == [(0, chunks), (chunks, chunks)] and chunks > 1
    assert_start_and_end(lines)


def test_a_resumed_stage_counts_the_units_done_before(tmp_path, monkeypatch):
    root = make_project(tmp_path / "p")
    args = ["regularize", root, "--name", "r", "--class-prompt", "a photo of a dog", "--batch-size", "1",
            "--steps", "1", "--size", "64"]
    ok(*args, "--num-images", "2")
    # Asking for 4 images keeps the 2 made: the run starts at 2 of 4 batches.
    lines = progress_lines(invoke_logged(monkeypatch, *args, "--num-images", "4"), "regularize")
    assert counts(lines) == [(2, 4), (3, 4), (4, 4), (4, 4)]
    assert_start_and_end(lines)
    assert lines[1]["unit"] == "batches"


def test_an_invalid_interval_warns_once_and_gives_the_default(monkeypatch, capsys):
    monkeypatch.setattr(log, "_interval_warned", False)
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("VFX_PROGRESS_INTERVAL", bad)
        assert log.progress_interval() == log.DEFAULT_INTERVAL
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "VFX_PROGRESS_INTERVAL='soon'" in lines[0], lines
    monkeypatch.setenv("VFX_PROGRESS_INTERVAL", "2.5")
    assert log.progress_interval() == 2.5
    monkeypatch.delenv("VFX_PROGRESS_INTERVAL")
    assert log.progress_interval() == 30


def test_a_terminal_keeps_the_rich_bar_counted_from_the_units_done_before(monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(log, "err", Console(file=screen, force_terminal=True, width=160))
    monkeypatch.setattr(log, "_quiet", False)
    with log.progress("train", 30, "steps", done=15) as bar:
        bar.values(loss=0.25, prior=None, lr=1e-4)
        bar.advance()
    shown = screen.getvalue()
    assert "16/30" in shown and "loss 0.25 lr 0.0001" in shown and "prior" not in shown
    assert "\x1b[" in shown  # drawn as a live bar, not as plain lines
    assert "| start" not in shown


def test_quiet_shows_nothing(monkeypatch, capsys):
    monkeypatch.setattr(log, "_quiet", True)
    with log.progress("train", 4, "steps") as bar:
        bar.advance()
    assert capsys.readouterr().err == ""


def test_an_error_ends_the_plain_lines_with_stopped(monkeypatch):
    for forced in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(forced, raising=False)
    log_file = io.StringIO()
    monkeypatch.setattr(log, "err", Console(file=log_file, width=80))  # a file: no terminal
    monkeypatch.setattr(log, "_quiet", False)
    monkeypatch.setenv("VFX_PROGRESS_INTERVAL", "0")
    with pytest.raises(KeyError):
        with log.progress("decode", 4, "chunks", done=1) as bar:
            bar.phase("decoding")
            bar.advance()
            raise KeyError("boom")
    lines = [LINE.match(line) for line in log_file.getvalue().splitlines()]
    assert counts(lines) == [(1, 4), (2, 4), (2, 4)]
    assert lines[1]["rest"] == " | decoding" and lines[2]["rest"] == " | decoding | stopped"


def test_a_bar_opened_under_another_joins_its_display_on_a_terminal(monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(log, "err", Console(file=screen, force_terminal=True, width=120))
    monkeypatch.setattr(log, "live_terminal", lambda: True)
    monkeypatch.setattr(log, "_quiet", False)  # an earlier in-process command may have left it on
    with log.progress("run", 2, "stages") as overall:
        for stage in ("encode", "invert"):
            with log.progress(stage, 3, "chunks") as bar:  # rich allows one live display: this must join it
                bar.advance(3)
            overall.advance()
    text = screen.getvalue()
    assert "run" in text and "encode" in text and "invert" in text and log._display is None
