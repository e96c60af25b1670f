"""`vfx train`: learning, the prior term, exact resume, saved weights, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import DOG_PHOTOS, invoke, ok, require_shared, run_cli, tiny_pipe
from dreambooth_helpers import (
    CLASS_PROMPT, PROMPT, assert_same_tensors, file_states, make_photos, make_project, metrics,
    project_with_class_images, run_dir, train_args, trained_tensors, with_prior,
)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """A project with generated subject photos and 2 class images (dreambooth/prior/class)."""
    return project_with_class_images(tmp_path_factory.mktemp("db"))



def step_lines(root, name):
    return [m for m in metrics(root, name) if "loss" in m]


def eval_lines(root, name):
    return [m for m in metrics(root, name) if "eval_instance_loss" in m]


# ---------------------------------------------------------------- learning and the prior term


@pytest.mark.parametrize("source", ["generated", "dog-photos"])
def test_training_reduces_the_instance_loss_on_a_fixed_eval_set(db, source):
    root, photos, class_dir = db
    if source == "dog-photos":
        photos = require_shared(DOG_PHOTOS)
    name = f"learn-{source}"
    ok(*train_args(root, name, photos, *with_prior(class_dir), "--checkpoint-every", "3", steps=6))
    evals = eval_lines(root, name)
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert evals[-1]["eval_instance_loss"] < 0.9 * evals[0]["eval_instance_loss"], evals


def test_prior_term_is_in_the_batch_logged_and_weighted(db):
    root, photos, class_dir = db
    ok(*train_args(root, "prior-half", photos, *with_prior(class_dir, "0.5"), steps=2))
    lines = step_lines(root, "prior-half")
    assert len(lines) == 2
    for line in lines:
        assert line["prior_loss"] > 0 and line["instance_loss"] > 0
        # loss = instance + 0.5 * prior in float32: a product and a sum round, k = 4 eps32 (measured: 0.3).
        rounding = 4 * float(torch.finfo(torch.float32).eps)
        assert line["loss"] == pytest.approx(line["instance_loss"] + 0.5 * line["prior_loss"], rel=rounding, abs=0)
        assert line["lr"] == pytest.approx(1e-3) and line["step_seconds"] > 0


def test_prior_weight_zero_trains_exactly_as_without_class_images(db):
    root, photos, class_dir = db
    ok(*train_args(root, "lambda0", photos, *with_prior(class_dir, "0"), steps=2))
    ok(*train_args(root, "noprior", photos, steps=2))
    assert all(line["prior_loss"] is None for line in step_lines(root, "lambda0"))
    assert_same_tensors(trained_tensors(root, "lambda0"), trained_tensors(root, "noprior"))
    ok(*train_args(root, "lambda1", photos, *with_prior(class_dir), steps=2))
    assert not torch.equal(trained_tensors(root, "lambda1")["conv_in.weight"],
                           trained_tensors(root, "noprior")["conv_in.weight"])


def test_the_run_class_images_are_used_by_default(db):
    """`vfx regularize --name RUN` then `vfx train --name RUN` needs no class options."""
    root, photos, _ = db
    ok(*train_args(root, "prior", photos, steps=1))
    assert step_lines(root, "prior")[0]["prior_loss"] > 0
    record = json.loads((run_dir(root, "prior") / "weights" / "stage.json").read_text())
    assert "dreambooth/prior/class/manifest.json" in record["inputs"]


# ---------------------------------------------------------------- exact resume

# Every source of randomness and state on: crops, flips, posterior samples, offset noise, SNR weights,
# a warm-up + cosine LR schedule, the text encoder with its own LR, and class images.
RESUME_FULL = ["--random-crop", "--flip", "--offset-noise", "0.1", "--snr-gamma", "5", "--lr-scheduler", "cosine",
               "--lr-warmup-steps", "1", "--train-text-encoder", "--text-encoder-lr", "5e-4", "--eval-pairs", "1"]
RESUME_LORA = ["--mode", "lora", "--rank", "2", "--lora-dropout", "0.2", "--train-text-encoder", "--batch-size", "2",
               "--random-crop", "--lr-scheduler", "linear", "--eval-pairs", "0"]


def same_steps(a: list[dict], b: list[dict]) -> None:
    strip = lambda lines: [{k: v for k, v in m.items() if k != "step_seconds"} for m in lines]  # noqa: E731
    assert strip(a) == strip(b)


def test_resume_in_a_new_process_equals_an_uninterrupted_run(db):
    root, photos, class_dir = db
    args = [*with_prior(class_dir), *RESUME_FULL]
    ok(*train_args(root, "whole", photos, *args))
    stopped = json.loads(ok(*train_args(root, "split", photos, *args, "--stop-after", "2", "--json")).stdout)
    assert stopped["state"] == "partial" and stopped["step"] == 2
    assert not (run_dir(root, "split") / "weights").exists()
    assert (run_dir(root, "split") / "checkpoints" / "step-000002" / "state.json").is_file()
    proc = run_cli(*train_args(root, "split", photos, *args, "--resume", "latest", "--json"))
    assert json.loads(proc.stdout)["step"] == 4
    assert_same_tensors(trained_tensors(root, "whole"), trained_tensors(root, "split"))
    same_steps(step_lines(root, "whole"), step_lines(root, "split"))


def test_resume_depends_on_the_restored_rng_state(db):
    """Control: the equality above is not vacuous. Resuming with another generator state diverges."""
    from safetensors.torch import load_file, save_file

    root, photos, class_dir = db
    args = [*with_prior(class_dir), *RESUME_FULL]
    if not (run_dir(root, "whole") / "weights").exists():
        ok(*train_args(root, "whole", photos, *args))
    ok(*train_args(root, "tampered", photos, *args, "--stop-after", "2"))
    rng_file = run_dir(root, "tampered") / "checkpoints" / "step-000002" / "rng-0.safetensors"
    tensors = load_file(str(rng_file))
    tensors["generator"] = torch.Generator().manual_seed(12345).get_state()
    save_file(tensors, str(rng_file))
    ok(*train_args(root, "tampered", photos, *args, "--resume", "latest"))
    whole, tampered = trained_tensors(root, "whole"), trained_tensors(root, "tampered")
    assert any(not torch.equal(whole[k], tampered[k]) for k in whole)


def test_lora_resume_with_dropout_equals_an_uninterrupted_run(db):
    root, photos, class_dir = db
    args = [*with_prior(class_dir), *RESUME_LORA]
    ok(*train_args(root, "lora-whole", photos, *args))
    ok(*train_args(root, "lora-split", photos, *args, "--stop-after", "2"))
    # The same command again resumes by itself (same options), here for one more step, then to the end.
    ok(*train_args(root, "lora-split", photos, *args, "--stop-after", "1"))
    ok(*train_args(root, "lora-split", photos, *args, "--resume", "latest"))
    assert_same_tensors(trained_tensors(root, "lora-whole"), trained_tensors(root, "lora-split"))
    same_steps(step_lines(root, "lora-whole"), step_lines(root, "lora-split"))


def test_keep_prunes_old_checkpoints_and_rerun_is_up_to_date(db):
    root, photos, _ = db
    ok(*train_args(root, "keep", photos, "--checkpoint-every", "1", "--keep", "2", steps=3))
    names = sorted(p.name for p in (run_dir(root, "keep") / "checkpoints").iterdir())
    assert names == ["step-000002", "step-000003"]
    weights = run_dir(root, "keep") / "weights"
    before = file_states(weights)
    result = ok(*train_args(root, "keep", photos, "--checkpoint-every", "1", "--keep", "2", "--json", steps=3))
    assert json.loads(result.stdout)["up_to_date"] is True
    assert file_states(weights) == before
    # Other options with checkpoints present: refuse rather than silently start over.
    other = invoke(*train_args(root, "keep", photos, "--learning-rate", "5e-4", steps=3))
    assert other.exit_code == 2 and "--resume latest" in other.output and "--force" in other.output
    assert file_states(weights) == before


# ---------------------------------------------------------------- saved weights


def test_full_weights_load_with_from_pretrained_and_match_training(db):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from vfx.dreambooth.data import ImageSet, list_images, read_images
    from vfx.dreambooth.encoding import Latents, PromptConditioning
    from vfx.dreambooth.tracking import eval_loss, eval_set

    root, photos, _ = db
    ok(*train_args(root, "full", photos, "--train-text-encoder", steps=2))
    from vfx.models import tiny_model_dir

    pipe = StableDiffusionPipeline.from_pretrained(str(run_dir(root, "full") / "weights"))
    base = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir("tiny")))
    for trained, original in ((pipe.unet, base.unet), (pipe.text_encoder, base.text_encoder)):
        assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), original.parameters()))
    images = ImageSet.from_arrays(read_images(list_images(photos, "instance")), 64)
    fixed = eval_set(Latents(images, pipe.vae), 4, 0, 1000)
    cond = PromptConditioning([pipe.text_encoder], [pipe.tokenizer], [PROMPT], trained=False)
    value = eval_loss(pipe.unet, cond, [pipe.text_encoder], DDPMScheduler.from_config(pipe.scheduler.config), fixed)
    # The same weights and fixed (noise, timestep) pairs in float32: the same computation (measured: exactly
    # equal); k = 4 eps32 of the loss allows its mean to be summed in another order.
    assert value == pytest.approx(eval_lines(root, "full")[-1]["eval_instance_loss"],
                                  rel=4 * float(torch.finfo(torch.float32).eps), abs=0)
    info = json.loads((run_dir(root, "full") / "weights" / "dreambooth.json").read_text())
    assert info["mode"] == "full" and info["base_model_spec"] == "tiny"


def test_lora_loads_with_load_lora_weights_changes_output_and_scale_zero_is_base(db):
    from vfx.dreambooth.images import generate
    from vfx.diffusion.lora import apply_lora

    root, photos, _ = db
    ok(*train_args(root, "lora", photos, "--mode", "lora", "--learning-rate", "1e-2", steps=2))
    folder = run_dir(root, "lora") / "weights"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "dreambooth.json", "pytorch_lora_weights.safetensors", "stage.json"]

    def image(lora: str | None, scale: float = 1.0):
        pipe = tiny_pipe()
        if lora == "diffusers":
            pipe.load_lora_weights(str(folder))  # diffusers' own loader, nothing of ours
        elif lora == "ours":
            apply_lora(pipe, folder, scale)
        return generate(pipe, [PROMPT], [0], steps=2, guidance=7.5, width=64, height=64)

    base = image(None)
    assert (image("diffusers") != base).mean() > 0.5
    assert (image("ours", 0.0) == base).all()
    assert (image("ours", 1.0) == image("diffusers")).all()


def test_lora_with_text_encoder_applies_to_both(db):
    from vfx.diffusion.lora import apply_lora

    root, photos, _ = db
    ok(*train_args(root, "lora-te", photos, "--mode", "lora", "--train-text-encoder", "--learning-rate", "1e-2", steps=1))
    folder = run_dir(root, "lora-te") / "weights"
    assert all(k.startswith(("unet.", "text_encoder.text_model.")) for k in trained_tensors(root, "lora-te"))
    embeddings = []
    for loader, scale in ((None, None), ("ours", 0.0), ("ours", 1.0), ("diffusers", None)):
        pipe = tiny_pipe()
        if loader == "ours":
            apply_lora(pipe, folder, scale)
        elif loader == "diffusers":
            pipe.load_lora_weights(str(folder))  # diffusers' own loader reads the text-encoder part too
        embeddings.append(pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, False)[0].detach())
    base, off, on, theirs = embeddings
    assert torch.equal(base, off) and not torch.equal(base, on) and torch.equal(on, theirs)


def test_v_prediction_bf16_checkpointing_and_validation(tmp_path):
    root = make_project(tmp_path / "v", model="tiny-v")
    photos = make_photos(tmp_path / "photos", 2)
    result = ok(*train_args(root, "v", photos, "--mixed-precision", "bf16", "--gradient-checkpointing",
                            "--snr-gamma", "5", "--validation-prompt", "a zwx dog", "--validation-images", "1",
                            "--validation-steps", "2", "--json", steps=2))
    assert json.loads(result.stdout)["state"] == "complete"
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in step_lines(root, "v"))
    assert (run_dir(root, "v") / "validation" / "step-000002" / "00.png").is_file()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(run_dir(root, "v") / "weights"))
    assert pipe.scheduler.config.prediction_type == "v_prediction"


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def finished(db):
    root, photos, _ = db
    ok(*train_args(root, "finished", photos, steps=2))
    return root, photos


def bad_cases(tmp_path, photos, class_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(photos, broken)
    (broken / "zz-broken.jpg").write_bytes(b"not a jpeg at all")
    return {
        "no images": (["--instance-dir", empty], "holds no images"),
        "missing folder": (["--instance-dir", tmp_path / "nowhere"], "does not exist"),
        "unreadable image": (["--instance-dir", broken], "zz-broken.jpg is not a readable image"),
        "class prompt without class images": (["--class-prompt", "a photo of a cat"], "vfx regularize"),
        "resume without checkpoint": (["--resume", "latest"], "no checkpoint"),
        "resume from a non-checkpoint": (["--resume", str(tmp_path)], "not a training checkpoint"),
        "fp16 on cpu": (["--mixed-precision", "fp16"], "needs a GPU"),
        "bad mode": (["--mode", "half"], "--mode"),
        "bad name": (["--name", ".hidden"], "invalid run name"),
    }


@pytest.mark.parametrize("case", ["no images", "missing folder", "unreadable image", "class prompt without class images",
                                  "resume without checkpoint", "resume from a non-checkpoint", "fp16 on cpu",
                                  "bad mode", "bad name"])
def test_bad_input_exits_2_with_one_error_and_touches_nothing(db, finished, tmp_path, case):
    root, photos = finished
    extra, message = bad_cases(tmp_path, photos, db[2])[case]
    name = "fresh-run" if case.startswith("resume") else "finished"
    before = file_states(root / "dreambooth")
    args = train_args(root, name, photos, steps=2)
    if "--instance-dir" in extra:
        args[args.index("--instance-dir") + 1] = extra[1]
        extra = []
    if "--name" in extra:
        args[args.index("--name") + 1] = extra[1]
        extra = []
    force = () if case.startswith("resume") else ("--force",)  # --force with --resume is refused on its own
    result = invoke(*args, *extra, *force)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert file_states(root / "dreambooth") == before


def test_checkpoint_from_another_base_model_is_refused(finished, tmp_path):
    root, photos = finished
    before = file_states(root / "dreambooth")
    result = invoke(*train_args(root, "finished", photos, "--model", "tiny-v", "--resume", "latest", steps=2))
    assert result.exit_code == 2
    assert "another base model" in result.output
    assert file_states(root / "dreambooth") == before


def test_instance_prompt_without_identifier_only_warns(db):
    root, photos, class_dir = db
    args = train_args(root, "no-id", photos, *with_prior(class_dir), steps=1)
    args[args.index("--instance-prompt") + 1] = CLASS_PROMPT
    result = ok(*args)
    assert any(line.startswith("warning:") and "add an identifier" in line for line in result.output.splitlines())


def test_a_run_with_other_options_names_them_and_the_ways_on(db):
    from conftest import assert_bad, snapshot

    root, photos, _ = db
    ok(*train_args(root, "changed", photos, "--mode", "lora", "--stop-after", "2", steps=4))
    before = snapshot(run_dir(root, "changed"))
    message = assert_bad(invoke(*train_args(root, "changed", photos, "--mode", "lora", "--rank", "8", steps=4)),
                         "rank: 4 → 8", "--resume latest", "--force")
    assert "learning_rate" not in message  # only what differs
    assert snapshot(run_dir(root, "changed")) == before
