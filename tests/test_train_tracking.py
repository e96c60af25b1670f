"""Training as a batch job sees it: plain progress lines with the loss, prior loss and learning rate,
counted over the whole run after a resume; TensorBoard events under grouped tags, every step once after a
resume, and the validation images."""

from __future__ import annotations

import re

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from dreambooth_helpers import CLASS_PROMPT, PROMPT, make_photos, make_project, metrics, run_dir, train_args
from progress_helpers import assert_start_and_end, counts, progress_lines, run_logged

STEPS = 4
STEP_TAGS = ("loss/total", "loss/instance", "loss/prior", "lr/unet", "lr/text_encoder")
VALUES = re.compile(r" \| loss (\S+) prior (\S+) lr (\S+)(?: \| end)?")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A 4-step run stopped after 3 steps (checkpoints at 2 and 3), then resumed from step 2: step 3 is
    logged twice, and the resumed run has to hide the first one. Returns (project, stderr 1, stderr 2)."""
    tmp = tmp_path_factory.mktemp("tracking")
    root, photos = make_project(tmp / "p"), make_photos(tmp / "photos")
    args = train_args(root, "r", photos, "--class-dir", photos, "--class-prompt", CLASS_PROMPT, "--resolution", "64",
                      "--train-text-encoder", "--validation-prompt", PROMPT, "--validation-steps", "1",
                      "--validation-images", "1", steps=STEPS)
    first = run_logged(*args, "--stop-after", "3").stderr
    second = run_logged(*args, "--resume", run_dir(root, "r") / "checkpoints" / "step-000002").stderr
    return root, first, second


def step_metrics(root) -> dict[int, dict]:
    return {line["step"]: line for line in metrics(root, "r") if "loss" in line}


def test_progress_lines_carry_loss_prior_and_lr_and_count_from_the_checkpoint(resumed):
    root, first, second = resumed
    stopped, continued = progress_lines(first, "train"), progress_lines(second, "train")
    assert counts(stopped) == [(0, 4), (1, 4), (2, 4), (3, 4), (3, 4)]
    assert counts(continued) == [(2, 4), (3, 4), (4, 4), (4, 4)]
    for lines in (stopped, continued):
        assert_start_and_end(lines)
        assert all(m["unit"] == "steps" for m in lines)
    logged = step_metrics(root)
    # The first run's step 3 was redone; every other line shows the values metrics.jsonl holds.
    for line in stopped[1:3] + continued[1:]:
        loss, prior, lr = map(float, VALUES.fullmatch(line["rest"]).groups())
        step = logged[int(line["done"])]
        assert loss == pytest.approx(step["loss"], rel=1e-3)
        assert prior == pytest.approx(step["prior_loss"], rel=1e-3)
        assert lr == pytest.approx(step["lr"], rel=1e-3) and lr == 1e-3


def test_tensorboard_holds_grouped_scalars_each_step_once_after_a_resume(resumed):
    root = resumed[0]
    board = run_dir(root, "r") / "tensorboard"
    raw = [event.step for path in sorted(board.glob("events.out.tfevents.*"))
           for event in EventFileLoader(str(path)).Load()
           if any(value.tag == "loss/total" for value in event.summary.value)]
    assert raw == [1, 2, 3, 3, 4]  # step 3 from both runs: the purge is what hides the first
    events = EventAccumulator(str(board), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) >= {*STEP_TAGS, "loss/eval_instance"}
    for tag in STEP_TAGS:
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3, 4], tag
    assert [e.step for e in events.Scalars("loss/eval_instance")] == [0, 2, 4]
    logged = step_metrics(root)
    for tag, key in (("loss/total", "loss"), ("loss/prior", "prior_loss"), ("lr/text_encoder", "lr_text_encoder")):
        assert [e.value for e in events.Scalars(tag)] == pytest.approx([logged[s][key] for s in range(1, 5)])


def test_tensorboard_holds_the_validation_images_at_their_steps(resumed):
    events = EventAccumulator(str(run_dir(resumed[0], "r") / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["validation/0"]
    images = events.Images("validation/0")
    assert [(image.step, image.width, image.height) for image in images] == [(2, 64, 64), (4, 64, 64)]
    assert all(image.encoded_image_string.startswith(b"\x89PNG") for image in images)
