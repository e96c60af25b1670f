"""`vfx regularize`: the class-image cache, shards, bad input."""

from __future__ import annotations

import json

import pytest

from conftest import invoke, ok, run_cli, run_shards, vfx_command
from dreambooth_helpers import CLASS_PROMPT, file_states, make_project
from vfx.dreambooth.images import png_meta

ARGS = ["--num-images", "3", "--steps", "2", "--batch-size", "2"]


def regularize(root, *extra, name="prior", prompt=CLASS_PROMPT):
    return ok("regularize", root, "--name", name, "--class-prompt", prompt, *ARGS, *extra)


def pngs(root, name="prior"):
    return {p.name: p.read_bytes() for p in sorted((root / "dreambooth" / name / "class").glob("*.png"))}


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path / "proj")


def test_images_manifest_and_unchanged_key_never_regenerates(project):
    regularize(project)
    folder = project / "dreambooth" / "prior" / "class"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [i["seed"] for i in manifest["images"]] == [0, 1, 2]
    assert manifest["prompt"] == CLASS_PROMPT and manifest["width"] == 64
    images = pngs(project)
    assert len(images) == 3 and len(set(images.values())) == 3  # lossless PNGs, each its own seed
    before = file_states(folder)
    result = regularize(project, "--json")
    assert json.loads(result.stdout)["up_to_date"] is True
    assert file_states(folder) == before


def test_more_images_reuse_every_complete_group(project):
    regularize(project)
    folder = project / "dreambooth" / "prior" / "class"
    before = file_states(folder)
    result = ok("regularize", project, "--name", "prior", "--class-prompt", CLASS_PROMPT, "--num-images", "5",
                "--steps", "2", "--batch-size", "2", "--json")
    # Groups [0,1] and [2,3] / [4]: the old group [2] had other batch-mates, so only [0,1] is reused.
    assert json.loads(result.stdout)["computed_units"] == 2
    after = file_states(folder)
    assert after["000000.png"] == before["000000.png"] and after["000001.png"] == before["000001.png"]
    assert after["000002.png"] != before["000002.png"]
    fresh = make_project(project.parent / "fresh")
    ok("regularize", fresh, "--name", "prior", "--class-prompt", CLASS_PROMPT, "--num-images", "5",
       "--steps", "2", "--batch-size", "2")
    assert pngs(fresh) == pngs(project)


def test_changed_prompt_or_model_regenerates(project):
    regularize(project)
    first = pngs(project)
    key = png_meta(project / "dreambooth" / "prior" / "class" / "000000.png")["key"]
    regularize(project, prompt="a photo of a cat")
    cat = pngs(project)
    assert cat.keys() == first.keys() and all(cat[k] != first[k] for k in first)
    assert png_meta(project / "dreambooth" / "prior" / "class" / "000000.png")["key"] != key
    regularize(project, "--model", "tiny-v", prompt="a photo of a cat")
    other_model = pngs(project)
    assert all(other_model[k] != cat[k] for k in cat)
    manifest = json.loads((project / "dreambooth" / "prior" / "class" / "manifest.json").read_text())
    assert manifest["model_spec"] == "tiny-v"


@pytest.mark.slow
def test_two_concurrent_shards_make_the_same_images_as_one_process(project, tmp_path):
    
    args = ["regularize", str(project), "--name", "prior", "--class-prompt", CLASS_PROMPT, "--num-images", "4",
            "--steps", "2", "--batch-size", "1"]
    run_shards(vfx_command(*args))
    single = make_project(tmp_path / "single")
    ok("regularize", single, "--name", "prior", "--class-prompt", CLASS_PROMPT, "--num-images", "4",
       "--steps", "2", "--batch-size", "1")
    assert len(pngs(project)) == 4
    assert pngs(project) == pngs(single)
    record = json.loads((project / "dreambooth" / "prior" / "class" / "stage.json").read_text())
    assert record["state"] == "complete"
    assert (project / "dreambooth" / "prior" / "class" / "manifest.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--name", "../escape", "--class-prompt", CLASS_PROMPT], "invalid run name"),
        (["--name", "prior", "--class-prompt", CLASS_PROMPT, "--num-images", "0"], "--num-images"),
        (["--name", "prior", "--class-prompt", "  "], "class-prompt"),
        (["--name", "prior", "--class-prompt", " ".join(["dog"] * 90)], "tokens long"),
    ],
)
def test_bad_input_exits_2_and_keeps_existing_images(project, args, message):
    regularize(project)
    folder = project / "dreambooth" / "prior" / "class"
    before = file_states(folder)
    result = invoke("regularize", project, *args, "--steps", "2")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert file_states(folder) == before


def test_exit_code_is_real_in_a_subprocess(project):
    proc = run_cli("regularize", project, "--name", "a/b", "--class-prompt", CLASS_PROMPT, check=False)
    assert proc.returncode == 2 and "invalid run name" in proc.stderr and not proc.stdout
