"""Shared fixtures: an isolated model cache, generated and real videos, CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SHARED_VIDEO = SHARED / "videos" / "woman-running.mp4"
DOG_PHOTOS = SHARED / "dreambooth" / "dog"


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """One tiny-model cache for the whole session, away from the user's ~/.cache."""
    cache = os.environ.get("VFX_TEST_CACHE_DIR") or str(tmp_path_factory.mktemp("vfx-cache"))
    os.environ["VFX_CACHE_DIR"] = cache
    os.environ["VFX_QUIET"] = "1"
    return Path(cache)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Byte-identity holds for one thread count: CPU kernels split reductions by thread. Tests compare
    in-process runs with subprocess runs (which may run side by side on few cores, where busy-waiting
    thread pools thrash), so every test and every subprocess it starts uses one thread."""
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def run_cli(*args: str, check: bool = True, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m vfx ARGS` in a subprocess (the real entry point, exit codes and all)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "vfx", *map(str, args)], capture_output=True, text=True, env=full_env, cwd=cwd
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"vfx {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def invoke(*args: str):
    """Run the CLI in-process (fast); returns the click Result."""
    from typer.testing import CliRunner

    from vfx.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def make_video(path: Path, frames: list[np.ndarray], fps: int = 10) -> Path:
    from vfx.media import write_mp4

    write_mp4(path, frames, Fraction(fps))
    return path


def textured(size: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture (feature-rich, so correspondences are unambiguous)."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.random((size // 4, size // 4, 3)).astype(np.float32)
    return (cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1) * 255).astype(np.uint8)


def image_folder(folder: Path, frames: list[np.ndarray]) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{index:04d}.png")
    return folder


@pytest.fixture
def gen_video(tmp_path) -> Path:
    from vfx.media import synthetic_video

    return synthetic_video(tmp_path / "clip.mp4", frames=12, size=64, fps=12)


@pytest.fixture
def project(tmp_path, gen_video) -> Path:
    """An initialised project on a 12-frame 64x64 generated clip, chunks of 4 frames."""
    root = tmp_path / "proj"
    result = invoke("init", root, "--video", gen_video, "--size", "64x64", "--chunk-frames", "4")
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def encoded(project) -> Path:
    for stage in ("extract", "encode"):
        result = invoke(stage, project)
        assert result.exit_code == 0, result.output
    return project


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared test data not found at {path}")
    return path
