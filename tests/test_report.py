"""`vfx report`: the page's structure, its files and commands, atomic and idempotent writes, refusals,
and the page in a real headless Chromium (file://, every video playable, synchronised controls)."""

from __future__ import annotations

import html
import io
import os
import re
import shlex
from fractions import Fraction
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import av
import numpy as np
import pytest
from browser_helpers import Browser, find_chromium
from conftest import EDIT_STEPS, assert_bad, invoke, ok, ok_json, snapshot, status_rows, video_project
from PIL import Image
from test_eval import tiny_clip  # noqa: F401  (a fixture)

from vfx.metrics import psnr
from vfx.store import open_array

EDIT = "red"


@pytest.fixture(scope="module")
def full(tmp_path_factory, tiny_clip):  # noqa: F811
    """A 12-frame 64x64 project through every video stage: the source decoded, one edit decoded and
    evaluated with CLIP, the inversion evaluated."""
    from vfx.media import synthetic_video

    base = tmp_path_factory.mktemp("report")
    video = synthetic_video(base / "clip.mp4", frames=12, size=64, fps=12)
    steps = str(EDIT_STEPS)
    return video_project(base / "proj", video, "--size", "64x64", "--chunk-frames", "4", "--prompt", "a disc", stages=(
        "extract", "encode", ("invert", "--steps", steps, "--save-steps", steps), "flow",
        ("edit", "--name", EDIT, "--prompt", "a red robot", "--steps", steps), "decode", ("decode", "--edit", EDIT),
        ("eval", "--edit", EDIT, "--clip", tiny_clip), ("eval", "--inversion")))


class Tags(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def of(self, tag: str) -> list[dict]:
        return [attrs for name, attrs in self.tags if name == tag]


def parse(page: Path) -> Tags:
    tags = Tags()
    tags.feed(page.read_text())
    return tags


def check_self_contained(page: Path) -> Tags:
    """No external URL in any src/href, every relative src names an existing file, no external
    stylesheet, script or font; returns the parsed tags."""
    tags = parse(page)
    text = page.read_text()
    for _, attrs in tags.tags:
        for key in ("src", "href"):
            value = attrs.get(key)
            if value is None:
                continue
            assert not value.startswith(("http://", "https://", "//")), value
            if value.startswith("#"):
                continue
            assert (page.parent / unquote(value)).is_file(), value
    assert not tags.of("link") and all("src" not in attrs for attrs in tags.of("script"))
    assert "@import" not in text and "url(" not in text and "@font-face" not in text
    return tags


def videos(tags: Tags) -> list[dict]:
    return tags.of("video")


def read_video(path: Path) -> tuple[np.ndarray, Fraction]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        return frames, stream.average_rate


def test_report_page_videos_sheets_plots_and_commands(full, tiny_clip):  # noqa: F811
    result = ok_json("report", full)
    page = full / "report" / "index.html"
    assert result["path"] == str(page)
    tags = check_self_contained(page)
    text = page.read_text()

    # Source | reconstruction | inversion | each edit, as synchronised videos with one scrubber.
    srcs = [v["src"] for v in videos(tags)]
    assert srcs == ["source.mp4", "../decoded/source/video.mp4", "../inversion/reconstruction.mp4",
                    f"../decoded/{EDIT}/video.mp4"]
    assert all("sync" in v["class"] and "muted" in v for v in videos(tags))
    assert [i["type"] for i in tags.of("input")] == ["range"] and tags.of("input")[0]["max"] == "11"
    assert len(tags.of("button")) == 1

    # source.mp4 is the extracted frames (H.264, so close rather than equal) at their fps.
    frames = np.asarray(open_array(full / "frames" / "frames.zarr"))
    decoded, rate = read_video(full / "report" / "source.mp4")
    assert decoded.shape == frames.shape and rate == 12
    assert min(psnr(a, b) for a, b in zip(decoded, frames)) > 30

    # The contact sheet: source, reconstruction and edit rows, tiles at the frames' own size (64 px, 4 px gaps).
    indices = result["sheets"][EDIT]["frames"]
    assert indices[0] == 0 and indices[-1] == 11 and len(indices) == 6
    sheet = np.asarray(Image.open(full / "report" / result["sheets"][EDIT]["src"]).convert("RGB"))
    assert sheet.shape == (4 + 3 * 68, 4 + 6 * 68, 3)
    edit = np.asarray(open_array(full / "decoded" / EDIT / "frames.zarr"))
    reconstruction = np.asarray(open_array(full / "inversion" / "reconstruction.zarr"))
    for column, index in enumerate(indices):
        x = 4 + column * 68
        assert np.array_equal(sheet[4:68, x:x + 64], frames[index])
        assert np.array_equal(sheet[72:136, x:x + 64], reconstruction[index])
        assert np.array_equal(sheet[140:204, x:x + 64], edit[index])
    assert tags.of("img")[0]["src"] == result["sheets"][EDIT]["src"]

    # Per-frame plots: warp error per pair (N-1 points), PSNR/SSIM and CLIP-T per frame (N).
    assert result["evaluations"] == ["inversion", EDIT]
    titles = [t for t in text.split("<title>")[2:]]  # after the page's own <title>
    assert any(t.startswith("CLIP-T") for t in titles) and any(t.startswith("CLIP-F") for t in titles)
    assert any(t.startswith("reconstruction PSNR") for t in titles)
    lines = [attrs["points"].split() for attrs in tags.of("polyline")]
    assert {len(points) for points in lines} == {11, 12}
    assert len(tags.of("svg")) == 3 + 3  # inversion: warp, PSNR, SSIM; edit: warp, CLIP-F, CLIP-T

    # The stage table: every status row, with a command that makes its artifacts again (up to date).
    rows = status_rows(full)
    table = {folder: html.unescape(command)
             for folder, command in re.findall(r"<tr><td>([^<]*)</td>.*?<code>([^<]*)</code></td></tr>", text)}
    assert sorted(table) == sorted(rows) and result["next_steps"] == []
    for folder, command in table.items():
        argv = [str(tiny_clip) if word == "CLIP" else word for word in shlex.split(command)]
        assert argv[:3] == ["vfx", rows[folder]["stage"], str(full)], command
        assert ok_json(*argv[1:])["up_to_date"] is True, command


def test_report_elsewhere_uses_relative_paths(full, tmp_path):
    out = tmp_path / "reports" / "today.html"
    ok("report", full, "--out", out)
    tags = check_self_contained(out)
    assert [v["src"] for v in videos(tags)][1] == os.path.relpath(full / "decoded" / "source" / "video.mp4", out.parent)
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.json", "sheet-red.png", "source.mp4", "today.html"]


def test_report_is_idempotent_and_swapped_in_whole(full, monkeypatch):
    ok("report", full)
    before = snapshot(full / "report")
    ok("report", full)
    assert snapshot(full / "report") == before  # byte-identical

    import vfx.report.build

    def other_video(frames, fps, path):
        path.write_bytes(b"a different video")

    def broken(*args):
        raise RuntimeError("disk on fire")

    # A run that fails after writing a different source.mp4 leaves every byte of the old report.
    monkeypatch.setattr(vfx.report.build, "source_video", other_video)
    monkeypatch.setattr(vfx.report.build, "render", broken)
    assert invoke("report", full).exit_code == 1
    assert snapshot(full / "report") == before
    assert not list(full.glob(".report.partial-*"))


def test_report_without_decodes_says_what_to_run(project):
    ok("report", project)
    page = project / "report" / "index.html"
    text = page.read_text()
    assert "No frames yet" in text and not videos(check_self_contained(page))
    assert f"<code>vfx extract {project}</code>" in text

    ok("extract", project)
    result = ok_json("report", project)
    text = page.read_text()
    tags = check_self_contained(page)
    assert [v["src"] for v in videos(tags)] == ["source.mp4"]
    assert "Nothing decoded yet" in text and f"vfx decode {project}" in text
    assert result["next_steps"][:3] == [f"vfx encode {project}", f"vfx invert {project}", f"vfx flow {project}"]
    assert f"vfx decode {project}" in result["next_steps"]
    assert "No evaluation yet" in text and "No decoded edit yet" in text


def test_report_refusals_change_nothing(project, tmp_path):
    ok("report", project)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert_bad(invoke("report", project, "--out", tmp_path / "mine" / "index.html"), "no vfx report")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"

    link = project / "report" / "link.html"
    link.symlink_to(project / "report" / "index.html")
    assert_bad(invoke("report", project, "--out", link), "symbolic link")
    link.unlink()
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    assert_bad(invoke("report", project, "--out", tmp_path / "linked" / "index.html"), "symbolic link")
    assert_bad(invoke("report", project, "--out", project / "report" / "index.txt"), ".html")
    ok("extract", project)
    before = snapshot(project)
    assert_bad(invoke("report", project, "--out", project / "frames" / "index.html"), "stage folder")
    assert snapshot(project) == before and not list((tmp_path / "real").iterdir())


# ---------------------------------------------------------------- in a real browser

WAIT_VIDEOS = """Promise.all(Array.from(document.querySelectorAll('video')).map(function (v) {
  return new Promise(function (done) {
    function report() { var r = v.getBoundingClientRect();
      done({src: v.getAttribute('src'), ready: v.readyState, duration: v.duration, error: v.error && v.error.code,
            frames: +v.dataset.frames, fps: +v.dataset.fps, box: [r.left, r.top, r.width, r.height]}); }
    if (v.readyState >= 3) { report(); return; }
    v.addEventListener('canplay', report); v.addEventListener('error', report); setTimeout(report, 30000);
  });
}))"""

PLAY_PAUSE_SCRUB = """(async function () {
  var vs = Array.from(document.querySelectorAll('video.sync'));
  var play = document.getElementById('play'), scrub = document.getElementById('scrub');
  play.click();
  await new Promise(function (done) { setTimeout(done, 500); });
  var playing = vs.map(function (v) { return !v.paused; });
  play.click();
  var times = vs.map(function (v) { return v.currentTime; });
  var paused = vs.map(function (v) { return v.paused; });
  scrub.value = 7; scrub.dispatchEvent(new Event('input'));
  await Promise.all(vs.map(function (v) {
    return new Promise(function (done) { if (!v.seeking) { done(); } else { v.addEventListener('seeked', done); } });
  }));
  return {playing: playing, times: times, paused: paused, label: document.getElementById('frame').textContent,
          scrubbed: vs.map(function (v) { return v.currentTime; })};
})()"""


@pytest.fixture
def chromium() -> str:
    """The browser's executable (looked for before the project is built)."""
    found = find_chromium()
    if found is None:
        if os.environ.get("VFX_REQUIRE_BROWSER"):
            pytest.fail("VFX_REQUIRE_BROWSER is set but no chromium was found: apt-get install chromium "
                        "(or set VFX_CHROMIUM to the browser)")
        pytest.skip("chromium not found (apt-get install chromium); set VFX_REQUIRE_BROWSER=1 to fail instead")
    return found


@pytest.mark.slow
def test_report_plays_in_headless_chromium(chromium, full):
    ok("report", full)
    page = full / "report" / "index.html"
    with Browser(chromium, width=1400, height=900) as browser:
        browser.open(page.as_uri())
        found = browser.evaluate(WAIT_VIDEOS)
        assert [v["src"] for v in found] == [v["src"] for v in videos(parse(page))] and len(found) == 4
        for video in found:
            assert video["error"] is None and video["ready"] >= 3, video
            assert video["frames"] == 12 and video["fps"] == 12
            assert abs(video["duration"] - video["frames"] / video["fps"]) <= 1 / video["fps"], video

        shot = np.asarray(Image.open(io.BytesIO(browser.screenshot())).convert("L"), dtype=np.float64)
        assert shot.std() > 20
        for video in found:  # each video shows its picture: no blank (black or white) tile
            left, top, width, height = (int(round(value)) for value in video["box"])
            tile = shot[top + 2:top + height - 2, left + 2:left + width - 2]
            assert tile.size and tile.std() > 8, video

        state = browser.evaluate(PLAY_PAUSE_SCRUB)
        assert all(state["playing"]) and all(state["paused"]), state
        assert max(state["times"]) - min(state["times"]) <= 1.5 / 12 and max(state["times"]) > 0, state
        assert state["label"] == "frame 7 / 11"
        assert all(int(t * 12) == 7 for t in state["scrubbed"]), state
        assert browser.problems() == []
