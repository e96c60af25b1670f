"""`vfx flow` and vfx/opticalflow.py: accuracy on known motion, occlusion, the stage contract."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from conftest import DOG_PHOTOS, invoke, ok, pan, project_of, require_shared, run_cli, run_shards, textured, vfx_command

from vfx import opticalflow as F
from vfx.store import open_array

SHIFT = (0.6, -0.35)  # sub-pixel motion per frame, (dx, dy) in pixels


def dog_photo(size: int) -> np.ndarray:
    from vfx.media import read_image

    photo = read_image(require_shared(DOG_PHOTOS) / "00.jpg")
    h, w = photo.shape[:2]
    s = min(h, w)
    square = photo[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)


def read_flow(root) -> dict[str, np.ndarray]:
    return {name: np.asarray(open_array(root / "flow" / f"{name}.zarr")) for name in
            ("forward", "backward", "occlusion_forward", "occlusion_backward")}


# ---------------------------------------------------------------- the functions


def test_warp_samples_the_image_at_x_plus_flow():
    image = np.arange(5 * 6 * 3, dtype=np.float32).reshape(5, 6, 3)
    flow = np.zeros((2, 5, 6), np.float32)
    flow[0], flow[1] = 1.0, 2.0  # out(y, x) = image(y + 2, x + 1)
    out = F.warp(image, flow)
    assert np.array_equal(out[:3, :5], image[2:, 1:])
    flow[0], flow[1] = 0.5, 0.0  # half a pixel: the mean of two neighbours
    # Weights 1/2 are exact in binary: a product and a sum round, k = 4 eps of the image's scale (measured: exact).
    rounding = 4 * np.finfo(np.float32).eps * image.max()
    assert np.abs(F.warp(image, flow)[:, :5] - (image[:, :5] + image[:, 1:]) / 2).max() <= rounding
    grey = image[..., 0]
    assert F.warp(grey, flow).shape == grey.shape
    features = np.random.default_rng(0).random((5, 6, 70)).astype(np.float32)  # more channels than cv2 takes at once
    flow[0] = 1.0
    assert np.abs(F.warp(features, flow)[:, :5] - features[:, 1:]).max() <= 4 * np.finfo(np.float32).eps  # values < 1


def test_occlusion_rule_by_hand():
    h, w = 6, 8
    forward = np.zeros((2, h, w), np.float32)
    forward[0] = 1.0
    backward = -forward
    occluded = F.occlusion(forward, backward)
    # Consistent flow: only the last column (its target x + 1 leaves the frame) is occluded.
    assert occluded[:, -1].all() and not occluded[:, :-1].any()
    # Backward flow that does not return: |w_f + w_b|^2 = 1 > 0.01 * 1 + 0.5.
    assert F.fb_inconsistent(forward, np.zeros_like(forward)).all()
    # A mismatch just under the threshold passes: |0.7|^2 = 0.49 < 0.01 * (1 + 0.09) + 0.5.
    nearly = np.zeros_like(forward)
    nearly[0] = -0.3
    assert not F.fb_inconsistent(forward, nearly).any()
    # A motion boundary: flow jumps from 0 to 3 px between columns 3 and 4.
    step = np.zeros((2, h, w), np.float32)
    step[0, :, 4:] = 3.0
    boundary = F.motion_boundary(step)
    assert boundary[:, 3:5].all() and not boundary[:, :2].any() and not boundary[:, 6:].any()


@pytest.mark.parametrize("texture", ["generated", "photo"])
def test_subpixel_pan_flow_is_accurate_in_the_interior(tmp_path, texture):
    big = textured(160, seed=1) if texture == "generated" else dog_photo(160)
    root = project_of(tmp_path, pan(big, SHIFT, 4, 96))
    result = invoke("flow", root, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["state"] == "complete"
    arrays = read_flow(root)
    forward, backward = arrays["forward"].astype(np.float32), arrays["backward"].astype(np.float32)
    assert forward.shape == (3, 2, 96, 96) and arrays["forward"].dtype == np.float16
    assert arrays["occlusion_forward"].shape == (3, 96, 96) and arrays["occlusion_forward"].dtype == np.uint8
    inner = np.s_[:, 8:-8, 8:-8]
    forward_epe = np.hypot(forward[:, 0] - SHIFT[0], forward[:, 1] - SHIFT[1])[inner]
    backward_epe = np.hypot(backward[:, 0] + SHIFT[0], backward[:, 1] + SHIFT[1])[inner]
    assert forward_epe.max() < 0.5 and backward_epe.max() < 0.5
    assert forward_epe.mean() < 0.2
    # The interior is visible in both frames; the content moving out (right column, top row) is not.
    assert arrays["occlusion_forward"][inner].mean() < 0.05
    assert arrays["occlusion_forward"][:, :, -1].all() and arrays["occlusion_forward"][:, 0, :].all()


def test_moving_occluder_is_marked_occluded(tmp_path):
    background, patch = textured(96, seed=2), 255 - textured(96, seed=7)

    def frame(x0: int) -> np.ndarray:
        out = background.copy()
        out[32:64, x0 : x0 + 24] = patch[32:64, 10:34]
        return out

    root = project_of(tmp_path, [frame(20), frame(26), frame(32)])
    assert invoke("flow", root).exit_code == 0
    arrays = read_flow(root)
    for pair, x0 in enumerate((20, 26)):
        covered = arrays["occlusion_forward"][pair, 34:62, x0 + 24 : x0 + 30]  # background the square moves onto
        revealed = arrays["occlusion_backward"][pair, 34:62, x0 : x0 + 6]  # background the square uncovers
        assert covered.mean() > 0.9 and revealed.mean() > 0.9
        assert arrays["occlusion_forward"][pair, :, 70:].mean() < 0.1  # static background far away
        moving = arrays["forward"][pair, :, 36:60, x0 + 4 : x0 + 20].astype(np.float32)
        assert np.hypot(moving[0] - 6, moving[1]).mean() < 1.0


# ---------------------------------------------------------------- the stage contract


def test_shards_in_parallel_equal_one_process(project, gen_video, tmp_path):
    ok("extract", project)  # 12 frames, chunks of 4: 11 pairs in 3 units
    single = tmp_path / "single"
    ok("init", single, "--video", gen_video, "--size", "64x64", "--chunk-frames", "4")
    ok("extract", single)
    ok("flow", single)

    run_shards(vfx_command("flow", project), timeout=120)
    record = json.loads((project / "flow" / "stage.json").read_text())
    assert record["state"] == "complete" and record["params"]["method"] == "opencv-dis"
    assert record["params"]["preset"] == "medium" and record["inputs"] == {"frames/frames.zarr": json.loads(
        (project / "frames" / "stage.json").read_text())["artifacts"]["frames.zarr"]}
    sharded, alone = read_flow(project), read_flow(single)
    for name in sharded:
        assert sharded[name].tobytes() == alone[name].tobytes(), name
    assert np.abs(alone["forward"]).max() > 0  # the clip moves: not a trivially equal all-zero flow


def test_flow_resumes_is_idempotent_and_restarts_on_new_preset(project):
    assert invoke("extract", project).exit_code == 0
    first = json.loads(invoke("flow", project, "--shard", "1/2", "--json").stdout)
    assert first["state"] == "partial" and first["computed_units"] == 1 and first["units"] == 3
    status = json.loads(invoke("status", project, "--json").stdout)
    assert [row["state"] for row in status["stages"] if row["folder"] == "flow"] == ["partial"]
    rest = json.loads(invoke("flow", project, "--json").stdout)
    assert rest["state"] == "complete" and rest["computed_units"] == 2  # only the unfinished units
    resumed = read_flow(project)
    again = json.loads(invoke("flow", project, "--json").stdout)
    assert again["up_to_date"] and again["computed_units"] == 0
    forced = json.loads(invoke("flow", project, "--force", "--json").stdout)
    assert forced["computed_units"] == 3
    assert all(resumed[k].tobytes() == v.tobytes() for k, v in read_flow(project).items())
    fast = json.loads(invoke("flow", project, "--preset", "ultrafast", "--json").stdout)
    assert fast["computed_units"] == 3 and fast["preset"] == "ultrafast"
    assert json.loads((project / "flow" / "stage.json").read_text())["params"]["preset"] == "ultrafast"
    preview = project / "flow.png"
    assert invoke("inspect", project / "flow" / "forward.zarr", "--preview", preview).exit_code == 0
    assert preview.stat().st_size > 0


def test_flow_bad_inputs(project, tmp_path):
    missing = run_cli("flow", project, check=False)
    assert missing.returncode == 2 and "vfx extract" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert invoke("extract", project).exit_code == 0
    bad = invoke("flow", project, "--preset", "slow")
    assert bad.exit_code == 2 and not (project / "flow").exists()
    one = project_of(tmp_path, [textured(32)], name="one")
    assert invoke("flow", one).exit_code == 2
