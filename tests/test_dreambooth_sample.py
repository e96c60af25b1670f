"""`vfx sample`: guidance in one batch, seeds, grid, shards, trained weights (full and LoRA) and the base model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import invoke, ok, tiny_pipe
from dreambooth_helpers import PROMPT, make_photos, make_project, run_dir, train_args
from vfx.media import read_image

SAMPLE = ["--prompt", PROMPT, "--prompt", "a zwx dog on the beach", "--num-images", "2", "--steps", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A project with one full run and one LoRA run (2 steps each)."""
    base = tmp_path_factory.mktemp("sample")
    root = make_project(base / "proj")
    photos = make_photos(base / "photos", 2)
    ok(*train_args(root, "full", photos, steps=2))
    ok(*train_args(root, "lora", photos, "--mode", "lora", "--learning-rate", "1e-2", steps=2))
    return root


def images(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("0*.png"))}


def test_guidance_runs_both_halves_in_one_batch():
    from vfx.dreambooth.images import generate
    pipe = tiny_pipe()
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    try:
        first = generate(pipe, ["a dog", "a cat", "a car"], [0, 1, 2], steps=3, guidance=7.5, width=64, height=64)
        assert calls == [6, 6, 6]  # [uncond x3 | cond x3] in every UNet call
        calls.clear()
        generate(pipe, ["a dog"], [0], steps=3, guidance=1.0, width=64, height=64)
        assert calls == [1, 1, 1]  # no guidance, no unconditional half
    finally:
        hook.remove()
    alone = generate(pipe, ["a cat"], [1], steps=3, guidance=7.5, width=64, height=64)
    assert first.dtype == np.uint8 and first.shape == (3, 64, 64, 3)
    # An image depends on its own seed and prompt, not its batch-mates (up to float rounding).
    assert np.abs(alone[0].astype(int) - first[1].astype(int)).max() <= 1


def test_lora_run_samples_grid_seeds_and_scale(trained):
    root = trained
    result = ok("sample", root, "--name", "lora", *SAMPLE, "--json")
    folder = run_dir(root, "lora") / "samples"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [(i["prompt_index"], i["image_index"], i["seed"]) for i in manifest["images"]] == [
        (0, 0, 0), (0, 1, 1), (1, 0, 0), (1, 1, 1)]
    assert manifest["lora"].endswith("pytorch_lora_weights.safetensors")
    sheet = read_image(folder / "grid.png")
    assert sheet.shape == (128, 128, 3)  # 2 prompts x 2 images of 64 px
    assert np.array_equal(sheet[64:, :64], read_image(folder / "001-000.png"))
    assert json.loads(result.stdout)["state"] == "complete"
    trained_images = images(folder)

    ok("sample", root, "--name", "lora", *SAMPLE, "--base")
    base_images = images(run_dir(root, "lora") / "samples-base")
    assert base_images.keys() == trained_images.keys()
    assert all(base_images[k] != trained_images[k] for k in base_images)
    ok("sample", root, "--name", "lora", *SAMPLE, "--lora-scale", "0")
    assert images(folder) == base_images  # scale 0: exactly the base model

    rerun = ok("sample", root, "--name", "lora", *SAMPLE, "--lora-scale", "0", "--json")
    assert json.loads(rerun.stdout)["up_to_date"] is True


def test_full_run_samples_and_its_weights_work_as_model(trained):
    root = trained
    ok("sample", root, "--name", "full", *SAMPLE)
    weights = run_dir(root, "full") / "weights"
    ok("sample", root, "--name", "full", *SAMPLE, "--base", "--model", weights)
    assert images(run_dir(root, "full") / "samples") == images(run_dir(root, "full") / "samples-base")
    ok("sample", root, "--name", "lora", *SAMPLE, "--base")
    assert images(run_dir(root, "full") / "samples") != images(run_dir(root, "lora") / "samples-base")


def test_shards_make_the_same_images_as_one_process(tmp_path):
    one, two = make_project(tmp_path / "one"), make_project(tmp_path / "two")
    args = ["--name", "base", *SAMPLE, "--base", "--batch-size", "1"]
    ok("sample", one, *args)
    first = ok("sample", two, *args, "--shard", "0/2", "--json")
    assert json.loads(first.stdout)["state"] == "partial"
    assert not (run_dir(two, "base") / "samples-base" / "grid.png").exists()
    ok("sample", two, *args, "--shard", "1/2")
    a, b = run_dir(one, "base") / "samples-base", run_dir(two, "base") / "samples-base"
    assert images(a) == images(b) and len(images(a)) == 4
    assert (a / "grid.png").read_bytes() == (b / "grid.png").read_bytes()


def test_prompts_file_and_bad_input(tmp_path):
    root = make_project(tmp_path / "p")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# evaluation prompts\na zwx dog\n\na zwx dog in the snow\n")
    ok("sample", root, "--name", "base", "--prompts-file", prompts, "--num-images", "1", "--steps", "2", "--base")
    manifest = json.loads((run_dir(root, "base") / "samples-base" / "manifest.json").read_text())
    assert [i["prompt"] for i in manifest["images"]] == ["a zwx dog", "a zwx dog in the snow"]

    untrained = invoke("sample", root, "--name", "nothing", "--prompt", "a dog", "--steps", "2")
    assert untrained.exit_code == 2 and "vfx train" in untrained.output
    no_prompt = invoke("sample", root, "--name", "base", "--base")
    assert no_prompt.exit_code == 2 and "no prompts" in no_prompt.output
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert invoke("sample", root, "--name", "base", "--prompts-file", empty, "--base").exit_code == 2


def test_base_sampling_uses_the_run_base_model(tmp_path):
    root = make_project(tmp_path / "p")  # project default: tiny
    photos = make_photos(tmp_path / "photos", 1)
    ok(*train_args(root, "v", photos, "--model", "tiny-v", "--mode", "lora", steps=1))
    ok("sample", root, "--name", "v", "--prompt", PROMPT, "--num-images", "1", "--steps", "2", "--base")
    manifest = json.loads((run_dir(root, "v") / "samples-base" / "manifest.json").read_text())
    assert manifest["model"] == "tiny-v"
    ok("sample", root, "--name", "v", "--prompt", PROMPT, "--num-images", "1", "--steps", "2")
    manifest = json.loads((run_dir(root, "v") / "samples" / "manifest.json").read_text())
    assert manifest["model"] == "tiny-v" and manifest["lora"]


# ---------------------------------------------------------------- nothing lost


def test_a_bad_lora_changes_no_sample_and_damaged_weights_are_refused(trained, tmp_path):
    import shutil

    from conftest import assert_bad, snapshot, status_rows

    root = tmp_path / "copy"
    shutil.copytree(trained, root, symlinks=True)
    ok("sample", root, "--name", "lora", *SAMPLE)
    before = snapshot(root)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((run_dir(root, "lora") / "weights" / "pytorch_lora_weights.safetensors").read_bytes()[:100])
    assert_bad(invoke("sample", root, "--name", "lora", *SAMPLE, "--lora", truncated, "--force"), "truncated")
    assert snapshot(root) == before

    weights = run_dir(root, "lora") / "weights" / "pytorch_lora_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert status_rows(root, "--verify")["dreambooth/lora/weights"]["state"] == "damaged"
    assert_bad(invoke("sample", root, "--name", "lora", *SAMPLE, "--force"), "damaged", "vfx train")
    assert snapshot(root) == {**before, "dreambooth/lora/weights/pytorch_lora_weights.safetensors":
                              snapshot(root)["dreambooth/lora/weights/pytorch_lora_weights.safetensors"]}


def test_training_never_writes_through_a_linked_checkpoint_folder(trained, tmp_path):
    import shutil

    from conftest import assert_bad

    root = tmp_path / "copy"
    shutil.copytree(trained, root, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    checkpoints = run_dir(root, "full") / "checkpoints"
    shutil.rmtree(checkpoints)
    checkpoints.symlink_to(outside, target_is_directory=True)
    photos = make_photos(tmp_path / "photos", 2)
    assert_bad(invoke(*train_args(root, "full", photos, "--force", steps=2)), "symbolic link")
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
