"""The embedded tiny model's trained VAE: shipped small, loaded exactly, and good enough that the
demo's decoded video looks like the source."""

import subprocess
import sys

import numpy as np
import torch
from safetensors import safe_open

from conftest import REPO, SHARED_VIDEO, require_shared
from vfx import media, tiny_models as models
from vfx.metrics import psnr


def test_the_weights_ship_small_in_float16_with_their_scaling_factor():
    asset = models.TINY_VAE_ASSET
    assert asset.stat().st_size <= 5 * 2**20
    with safe_open(str(asset), framework="pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float16}
        assert set(weights.keys()) == set(models.bare_tiny_vae().state_dict())
        scale = float(weights.metadata()["scaling_factor"])
    assert models.tiny_vae().config.scaling_factor == scale


def test_the_package_data_ships_the_weights():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"assets/*.safetensors"' in pyproject
    tracked = subprocess.run(["git", "ls-files", "vfx/assets"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode == 0 and tracked.stdout:  # in a git checkout: the file is committed, not ignored
        assert "vfx/assets/tiny_vae.safetensors" in tracked.stdout.split()


@torch.no_grad()
def test_the_shared_video_round_trips_at_128_px_above_22_db():
    info = media.probe(require_shared(SHARED_VIDEO))
    frames = [media.resize_frame(frame, 128, 128) for index, _, frame in media.iter_source(info) if index % 10 == 0]
    vae = models.tiny_vae().eval()
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1
    latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    decoded = vae.decode(latents / vae.config.scaling_factor).sample
    out = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    scores = [psnr(a, b) for a, b in zip(frames, out)]
    assert np.mean(scores) >= 22.0, scores
    # The scaling factor makes the latents about unit variance, as the noise schedule assumes.
    assert 0.6 < float(latents.std()) < 1.6


def test_the_training_script_writes_weights_the_model_loads(tmp_path):
    out = tmp_path / "vae.safetensors"
    subprocess.run([sys.executable, str(REPO / "scripts" / "train_tiny_vae.py"), "--steps", "2",
                    "--batch-size", "2", "--out", str(out)], cwd=REPO, check=True, capture_output=True)
    with safe_open(str(out), framework="pt") as weights:
        assert set(weights.keys()) == set(models.bare_tiny_vae().state_dict())
        assert float(weights.metadata()["scaling_factor"]) > 0
