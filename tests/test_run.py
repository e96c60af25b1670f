"""`vfx run`: the whole edit in one command, each stage the ordinary idempotent one."""

from __future__ import annotations

from conftest import invoke, ok, snapshot, status_rows
from vfx.fsutil import read_json
from vfx.project import Project
from vfx.stage import RECORD

OPTIONS = ("--prompt", "a red robot", "--steps", "2")
STAGES = ["frames", "latents", "inversion", "flow", "decoded/source", "edits/a-red-robot", "decoded/a-red-robot",
          "eval/a-red-robot"]


def finished(root) -> dict[str, float | None]:
    """When each stage's latest computation started, to the microsecond: `finished` in status has whole
    seconds, and a tiny stage recomputed within the same second would look untouched."""
    return {folder: (read_json(root / folder / RECORD) or {}).get("started_unix") if row.get("finished") else None
            for folder, row in status_rows(root).items()}


def test_run_makes_every_stage_and_the_report_then_is_up_to_date(tmp_path, gen_video):
    root = tmp_path / "p"
    result = ok("run", root, gen_video, *OPTIONS, "--size", "32x32", "--max-frames", "4", "--source-prompt", "a disc",
                "--device", "cpu")
    report = root / "report" / "index.html"
    # the new project records the size and frame limit, not this run's device (no --model given)
    config = Project.open(root).config
    assert config.get("size") == "32x32" and config.get("max_frames") == 4 and config.get("device") == "auto"
    assert result.stdout.strip().splitlines()[-1] == f"report: {report}" and report.is_file()
    rows = status_rows(root)
    assert {folder: rows[folder]["state"] for folder in STAGES} == dict.fromkeys(STAGES, "complete")
    assert rows["inversion"]["params"]["save_steps"] == 2 and rows["edits/a-red-robot"]["params"]["steps"] == 2
    assert rows["inversion"]["params"]["prompt"] == "a disc" and rows["frames"]["params"]["size"] == [32, 32]
    # Each stage records its own command line, so status can print it.
    assert rows["edits/a-red-robot"]["recorded_command"]["argv"][:2] == ["edit", str(root)]

    before = snapshot(root)
    again = ok("run", root, *OPTIONS)  # the project's video, from its vfx.toml
    assert again.stdout.count("up to date") == 8  # every stage but the report, which is rebuilt identically
    assert snapshot(root) == before


def test_a_changed_option_recomputes_only_what_it_affects(tmp_path, gen_video):
    root = tmp_path / "p"
    ok("run", root, gen_video, *OPTIONS, "--size", "32x32", "--max-frames", "4")
    before = finished(root)
    ok("run", root, *OPTIONS, "--seed", "7")  # the edit's keyframe draws only
    after = finished(root)
    same = ["frames", "latents", "inversion", "flow", "decoded/source"]
    assert [after[f] for f in same] == [before[f] for f in same]
    assert all(after[f] != before[f] for f in STAGES if f not in same)


def test_a_run_that_fails_continues_where_it_stopped(tmp_path, gen_video, monkeypatch):
    import vfx.stages.evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    root = tmp_path / "p"
    with monkeypatch.context() as patch:
        patch.setattr(vfx.stages.evaluate, "evaluate", broken)
        result = invoke("run", root, gen_video, *OPTIONS, "--size", "32x32", "--max-frames", "4")
    assert result.exit_code == 1 and "disk on fire" in result.stderr
    assert not (root / "report").exists()
    before = finished(root)
    assert before["edits/a-red-robot"] and "eval/a-red-robot" not in before
    ok("run", root, *OPTIONS)
    after = finished(root)
    assert all(after[f] == before[f] for f in STAGES if f != "eval/a-red-robot")
    assert after["eval/a-red-robot"] and (root / "report" / "index.html").is_file()


def test_run_refuses_what_it_cannot_do_and_writes_nothing(tmp_path, gen_video):
    root = tmp_path / "p"
    assert invoke("run", root, "--prompt", "a red robot").exit_code == 2  # no project, no video
    assert invoke("run", root, gen_video, "--prompt", " ").exit_code == 2
    assert not root.exists()
