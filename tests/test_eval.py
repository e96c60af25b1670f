"""`vfx eval` and `vfx eval-subject`: warp error, PSNR/SSIM, CLIP/DINO with tiny local models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import cli_env, image_folder, invoke, ok_json, pan, project_of, run_cli, textured
from PIL import Image

from vfx import metrics
from vfx.stage import StageRun
from vfx.store import create_array, open_array

# Rounding levels: the pixel metrics' inputs are float32 (frames / 255), PSNR, SSIM and means float64.
EPS32, EPS64 = float(np.finfo(np.float32).eps), float(np.finfo(np.float64).eps)

# ---------------------------------------------------------------- tiny models, built locally


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP (32 px images, 16-d embeddings) with the project's tokenizer files."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from vfx.tokenizer import write_tokenizer_files

    folder = tmp_path_factory.mktemp("tiny-clip")
    vocab = write_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder)
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- stand-ins for upstream stages


def fake_stage(root, folder: str, stage: str, arrays: dict, params: dict | None = None, inputs: dict | None = None) -> None:
    """Write arrays and a complete record, as the stage `stage` would (decode, invert, ...)."""
    path = root / folder
    frames = open_array(root / "frames" / "frames.zarr")
    for name, data in arrays.items():
        create_array(path / f"{name}.zarr", data.shape, (frames.chunks[0],) + data.shape[1:], str(data.dtype))[...] = data
    frames_record = json.loads((root / "frames" / "stage.json").read_text())
    inputs = inputs or {"frames/frames.zarr": frames_record["artifacts"]["frames.zarr"]}
    StageRun(path, stage, params or {}, inputs, 1).complete_single({})


def frames_of(root) -> np.ndarray:
    return np.asarray(open_array(root / "frames" / "frames.zarr"))


def noisy(frames: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(frames + rng.normal(0, sigma, frames.shape), 0, 255).round().astype(np.uint8)


def eval_json(*args) -> dict:
    return ok_json("eval", *args)


# ---------------------------------------------------------------- warp error


def test_warp_error_matches_a_hand_computation(tmp_path):
    """3 frames of 8x8; flow 0 for pair 0, +1 px in x for pair 1, row 0 and column 7 occluded there."""
    o0 = np.zeros((8, 8, 3), np.uint8)
    o1 = np.full((8, 8, 3), 51, np.uint8)
    o2 = np.zeros((8, 8, 3), np.uint8)
    o2[:] = (51 + 20 * np.arange(8))[None, :, None]
    root = project_of(tmp_path, [o0, o1, o2], chunk=2)
    flow = np.zeros((2, 2, 8, 8), np.float16)
    flow[1, 0] = 1.0
    occluded = np.zeros((2, 8, 8), np.uint8)
    occluded[1, 0, :], occluded[1, :, 7] = 1, 1
    fake_stage(root, "flow", "flow", {"forward": flow, "backward": -flow, "occlusion_forward": occluded,
                                      "occlusion_backward": occluded}, {"method": "given", "preset": "hand"})
    fake_stage(root, "decoded/hand", "decode", {"frames": np.stack([o0, o1, o2])})

    # By hand: pair 0 compares O0 with O1 everywhere: 3 channels x (51/255)^2 = 0.12.
    # Pair 1 compares O1(y, x) with O2(y, x + 1) for rows 1-7, columns 0-6: 3 x (20 (x+1) / 255)^2.
    pair1 = [3 * (20 * (x + 1) / 255) ** 2 for y in range(1, 8) for x in range(7)]
    expected = (0.12 + sum(pair1) / len(pair1)) / 2
    # Mean of (x+1)^2 over 0..6 is 20. A float64 sum of 49 terms: at most a rounding each (measured: 1 eps).
    assert expected == pytest.approx((0.12 + 3 * 400 * 20 / 65025) / 2, rel=64 * EPS64, abs=0)

    summary = eval_json(root, "--edit", "hand")["metrics"]
    # Pixels / 255 in float32 (half an ulp each), then differences and squares: a few eps32 relative,
    # k = 8 (measured: at most 1.3).
    assert summary["warp_error"]["edit"] * 1e-3 == pytest.approx(expected, rel=8 * EPS32, abs=0)
    assert summary["warp_error"]["source"] == summary["warp_error"]["edit"]
    assert [v * 1e-3 for v in summary["per_frame"]["warp_error"]["edit"]] == pytest.approx(
        [0.12, sum(pair1) / len(pair1)], rel=8 * EPS32, abs=0)
    assert summary["flow"] == {"method": "given", "preset": "hand", "occlusion": None} and summary["warp_error_unit"] == 1e-3


def test_warp_error_pair_ignores_occluded_pixels_and_handles_all_occluded():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 6, 6, 3), dtype=np.uint8)
    flow = np.zeros((2, 6, 6), np.float32)
    mask = np.ones((6, 6), bool)
    assert metrics.warp_error_pair(a, b, flow, mask) is None
    mask[:] = False
    mask[2, 3] = True
    b2 = b.copy()
    b2[2, 3] = 0  # a change only under the occluded pixel does not count
    # The same valid pixels, summed in the same order: exactly equal.
    assert metrics.warp_error_pair(a, b2, flow, mask) == metrics.warp_error_pair(a, b, flow, mask)
    assert metrics.warp_error_pair(a, a, flow, mask) == 0.0


def test_warp_error_static_pan_and_noise(tmp_path, tiny_clip):
    texture = textured(96, seed=3)
    static = project_of(tmp_path, [texture[16:80, 16:80]] * 5, name="static")
    pan_root = project_of(tmp_path, pan(texture, (2, 1), 5, 64), name="pan")
    for root in (static, pan_root):
        assert invoke("flow", root).exit_code == 0
        fake_stage(root, "decoded/noisy", "decode", {"frames": noisy(frames_of(root), 10)})
        fake_stage(root, "decoded/copy", "decode", {"frames": frames_of(root)})

    still = eval_json(static, "--edit", "copy", "--clip", tiny_clip, "--prompt", "a photo of a dog")["metrics"]
    assert still["warp_error"] == {"edit": 0.0, "source": 0.0}
    # Identical frames: every consecutive CLIP cosine is 1 up to the rounding of a float32 cosine of
    # 16-d embeddings, k = 8 eps (measured: exact); CLIP-T is a cosine.
    assert still["clip_f"]["edit"] == pytest.approx(1.0, rel=0, abs=8 * EPS32)
    assert all(v == pytest.approx(1.0, rel=0, abs=8 * EPS32) for v in still["per_frame"]["clip_f"]["edit"])
    assert len(still["per_frame"]["clip_t"]) == 5 and -1 <= still["clip_t"] <= 1
    # One frame, one prompt: one score, up to batch-dependent float32 rounding (measured: 0.16 eps).
    assert np.ptp(still["per_frame"]["clip_t"]) <= 8 * EPS32

    moving = eval_json(pan_root, "--edit", "noisy")["metrics"]
    assert moving["warp_error"]["source"] < 0.2  # an exact pan: the flow explains (almost) everything
    # Noise sigma 10/255 in both frames of a pair: expected 2 x 3 x (10/255)^2 = 9.2e-3.
    assert moving["warp_error"]["edit"] == pytest.approx(9.2, rel=0.15)
    assert moving["warp_error"]["edit"] > 10 * moving["warp_error"]["source"]
    assert len(moving["per_frame"]["warp_error"]["edit"]) == 4


# ---------------------------------------------------------------- inversion


def test_inversion_psnr_ssim_then_warp_error_once_flow_exists(project, tmp_path):
    assert invoke("extract", project).exit_code == 0
    frames = frames_of(project)
    reconstruction = noisy(frames, 6)
    reconstruction[0] = frames[0]
    fake_stage(project, "inversion", "invert", {"reconstruction": reconstruction})

    plot = tmp_path / "curves.png"
    result = eval_json(project, "--inversion", "--plot", plot)
    summary = result["metrics"]
    assert result["folder"].endswith("eval/inversion") and result["plot"] == str(plot)
    assert "warp_error" not in summary  # no flow yet
    psnr, ssim = summary["per_frame"]["psnr"], summary["per_frame"]["ssim"]
    assert len(psnr) == len(ssim) == 12
    # SSIM, PSNR and their means are float64: k = 4 eps of the value (measured: exact), 16 for a mean of 12.
    assert psnr[0] == metrics.PSNR_IDENTICAL and ssim[0] == pytest.approx(1.0, rel=0, abs=4 * EPS64)
    mse = np.mean((reconstruction[5].astype(float) - frames[5]) ** 2)
    assert psnr[5] == pytest.approx(10 * np.log10(255**2 / mse), rel=4 * EPS64, abs=0)
    assert all(0 < s < 1 for s in ssim[1:])
    assert summary["psnr_mean"] == pytest.approx(np.mean(psnr), rel=16 * EPS64, abs=0)
    assert Image.open(plot).size[1] > 200

    assert invoke("flow", project).exit_code == 0
    again = eval_json(project, "--inversion")  # flow/ is a new input: recomputed with warp errors
    assert not again.get("up_to_date") and again["computed_units"] == 3
    assert set(again["metrics"]["warp_error"]) == {"reconstruction", "source"}
    assert again["metrics"]["warp_error"]["reconstruction"] > again["metrics"]["warp_error"]["source"]
    assert eval_json(project, "--inversion")["up_to_date"]


def test_ssim_properties():
    rng = np.random.default_rng(1)
    image = textured(64, seed=4)
    assert metrics.ssim(image, image) == pytest.approx(1.0, rel=0, abs=4 * EPS64)  # float64 (measured: exact)
    slightly, very = noisy(image, 5, 1), noisy(image, 40, 2)
    assert 1 > metrics.ssim(image, slightly) > metrics.ssim(image, very) > 0
    assert metrics.ssim(image, 255 - image) < 0  # inverted structure
    assert metrics.ssim(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), image[:32, :32]) < 0.2


def test_eval_shards_equal_one_process_and_record_inputs(tmp_path):
    root = project_of(tmp_path, pan(textured(96, seed=5), (1.5, 0.5), 7, 64), chunk=2)
    assert invoke("flow", root).exit_code == 0
    fake_stage(root, "decoded/e", "decode", {"frames": noisy(frames_of(root), 8)})
    first = eval_json(root, "--edit", "e", "--shard", "1/2")
    assert first["state"] == "partial" and first["metrics"] is None
    sharded = eval_json(root, "--edit", "e", "--shard", "0/2")["metrics"]
    single = eval_json(root, "--edit", "e", "--force")["metrics"]
    assert sharded == single
    record = json.loads((root / "eval" / "e" / "stage.json").read_text())
    assert set(record["inputs"]) == {"decoded/e/frames.zarr", "frames/frames.zarr", "flow/forward.zarr",
                                     "flow/occlusion_forward.zarr"}
    status = {row["folder"]: row["state"] for row in json.loads(invoke("status", root, "--json").stdout)["stages"]}
    assert status["eval/e"] == "complete"


# ---------------------------------------------------------------- DreamBooth metrics


def test_eval_subject_clip_and_dino(tmp_path, tiny_clip, tiny_vit):
    subject = textured(64, seed=10)
    same = image_folder(tmp_path / "same", [subject, subject])
    real = image_folder(tmp_path / "real", [subject])
    other = image_folder(tmp_path / "other", [textured(64, seed=s) for s in (11, 12, 13)])
    out = run_cli("eval-subject", "--samples", same, "--real", real, "--clip", tiny_clip, "--dino", tiny_vit, "--json")
    identical = json.loads(out.stdout)
    # Cosines of identical float32 embeddings: k = 8 eps (measured: under 1).
    assert identical["clip_i"] == pytest.approx(1.0, rel=0, abs=8 * EPS32)
    assert identical["dino"] == pytest.approx(1.0, rel=0, abs=8 * EPS32)
    result = json.loads(invoke("eval-subject", "--samples", other, "--real", real, "--prompt", "a photo of a dog",
                               "--clip", tiny_clip, "--dino", tiny_vit, "--json").stdout)
    for key in ("clip_i", "clip_t", "dino"):
        assert -1 <= result[key] <= 1
        assert len(result["per_sample"][key]) == 3 and all(-1 <= v <= 1 for v in result["per_sample"][key])
    assert result["clip_i"] < 1 - 1e-4 and result["dino"] < 1 - 1e-4
    # A mean of 3 scores, perhaps taken in float32: k = 4 eps32 of it (measured: exact).
    assert result["clip_i"] == pytest.approx(np.mean(result["per_sample"]["clip_i"]), rel=4 * EPS32, abs=0)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_exit_2_with_one_line(project, tiny_vit, tmp_path):
    assert invoke("extract", project).exit_code == 0
    nothing = run_cli("eval", project, "--edit", "ghost", check=False)
    assert nothing.returncode == 2 and len(nothing.stderr.strip().splitlines()) == 1
    assert "vfx edit" in nothing.stderr and "vfx decode" in nothing.stderr and "--edit ghost" in nothing.stderr
    assert not (project / "eval").exists()

    StageRun(project / "edits" / "ghost", "edit", {}, {}, 1).complete_single({})  # edited, not decoded
    undecoded = invoke("eval", project, "--edit", "ghost")
    assert undecoded.exit_code == 2 and "vfx decode" in undecoded.stderr and "--edit ghost" in undecoded.stderr

    fake_stage(project, "decoded/real", "decode", {"frames": frames_of(project)})
    no_flow = invoke("eval", project, "--edit", "real")
    assert no_flow.exit_code == 2 and "vfx flow" in no_flow.stderr
    assert invoke("flow", project).exit_code == 0
    not_clip = run_cli("eval", project, "--edit", "real", "--clip", tiny_vit, check=False)
    assert not_clip.returncode == 2 and "not a CLIP model" in not_clip.stderr
    assert len(not_clip.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert invoke("eval", project, "--edit", "real", "--clip", empty).exit_code == 2
    assert invoke("eval", project, "--edit", "../x").exit_code == 2
    assert invoke("eval", project).exit_code == 2  # neither --edit nor --inversion
    assert invoke("eval", project, "--edit", "real", "--inversion").exit_code == 2
    assert invoke("eval", project, "--edit", "inversion").exit_code == 2  # reserved for --inversion
    assert invoke("eval", project, "--inversion").exit_code == 2  # no inversion yet: names vfx invert
    assert not (project / "eval").exists()  # nothing written by any of these
    assert invoke("eval-subject", "--samples", empty, "--real", empty, "--clip", tiny_vit).exit_code == 2


def test_clip_and_dino_take_cached_hub_ids_like_model(tmp_path, tiny_clip, tiny_vit):
    """A Hub id already in the local cache works for --clip/--dino as for --model; one that is not is one line."""
    import shutil

    cache = tmp_path / "hub"
    for repo, folder in (("someone/tiny-clip", tiny_clip), ("someone/tiny-vit", tiny_vit)):
        entry = cache / f"models--{repo.replace('/', '--')}"
        shutil.copytree(folder, entry / "snapshots" / ("0" * 40))
        (entry / "refs").mkdir()
        (entry / "refs" / "main").write_text("0" * 40)
    env = cli_env(HF_HUB_CACHE=str(cache))  # read when huggingface_hub is imported: a fresh process
    subject = textured(64, seed=10)
    samples = image_folder(tmp_path / "samples", [subject, textured(64, seed=11)])
    real = image_folder(tmp_path / "real", [subject])
    by_folder = json.loads(invoke("eval-subject", "--samples", samples, "--real", real, "--clip", tiny_clip,
                                  "--dino", tiny_vit, "--json").stdout)
    by_id = json.loads(run_cli("eval-subject", "--samples", samples, "--real", real, "--clip", "someone/tiny-clip",
                               "--dino", "someone/tiny-vit", "--json", env=env).stdout)
    assert by_id["clip_i"] == by_folder["clip_i"] and by_id["dino"] == by_folder["dino"]
    missing = run_cli("eval-subject", "--samples", samples, "--real", real, "--clip", "someone/absent", env=env,
                      check=False)
    assert missing.returncode == 2 and "not in the local Hugging Face cache" in missing.stderr
