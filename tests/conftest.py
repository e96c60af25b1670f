"""Shared fixtures and helpers: an isolated model cache, a tiny ViT, generated and real videos, CLI runners,
project builders, snapshots, the bad-input check and the SIGKILL helper. (DreamBooth-only pieces
live in dreambooth_helpers.py.)"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SHARED_VIDEO = SHARED / "videos" / "woman-running.mp4"
DOG_PHOTOS = SHARED / "dreambooth" / "dog"

# What `vfx` sets for itself before anything of the Hub's is imported (vfx.cli.main); in-process tests
# import huggingface_hub long before a command runs, so the test process sets it at once, as vfx does.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# MKL may round a product differently by where its operands lie in memory (two instances of the same model
# in one process gave outputs 6e-7 apart); tests that compare bytes must see vfx's arithmetic, not the
# heap's. Set before torch first runs a BLAS call (docs/project-layout.md, Limits).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


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
    thread pools thrash: the tiny model's calls get ~100x slower, measured 2 s vs 0.02 s), so every
    test and every subprocess it starts uses one thread."""
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory):
    """A randomly initialised ViT in the DINO layout (AutoModel folder)."""
    import torch
    from transformers import ViTConfig, ViTModel

    folder = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


def cli_env(**extra: str) -> dict:
    """The environment of a `python -m vfx` subprocess: this checkout first on the path, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # concurrent processes on few cores: busy-waiting thread pools thrash
    env.update(extra)
    return env


def vfx_command(*args) -> list[str]:
    """The argv of `python -m vfx ARGS` with the test interpreter."""
    return [sys.executable, "-m", "vfx", *map(str, args)]


def run_shards(command: list, count: int = 2, timeout: float = 300) -> None:
    """`COMMAND --shard K/count` for every K at once, in subprocesses; every one must exit 0."""
    procs = [subprocess.Popen([*map(str, command), "--shard", f"{k}/{count}"], env=cli_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for k in range(count)]
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err


def run_cli(*args: str, check: bool = True, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m vfx ARGS` in a subprocess (the real entry point, exit codes and all)."""
    proc = subprocess.run(vfx_command(*args), capture_output=True, text=True, env=cli_env(**(env or {})), cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"vfx {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@functools.cache
def cli_command():
    """The app's click command, built once: building it takes longer than a command refusing its input."""
    import typer

    from vfx.cli import app

    return typer.main.get_command(app)


def invoke(*args: str):
    """Run the CLI in-process (fast); returns the click Result."""
    from unittest import mock

    from typer import testing

    from vfx.cli import app

    with mock.patch.object(testing, "_get_command", lambda _app: cli_command()):
        return testing.CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def ok(*args):
    """Run the CLI in-process; it must exit 0. Returns the click Result."""
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def ok_json(*args) -> dict:
    """`ok(*args, "--json")`, its one JSON document parsed."""
    return json.loads(ok(*args, "--json").stdout)


def status_rows(root: Path, *extra: str) -> dict[str, dict]:
    """`vfx status ROOT --json` (plus `extra`, e.g. --verify) as {folder: row}. It exits 0, or 1 under
    --verify when a row is damaged."""
    result = invoke("status", root, *extra, "--json")
    rows = {row["folder"]: row for row in json.loads(result.stdout)["stages"]}
    damaged = "--verify" in extra and any(row["state"] == "damaged" for row in rows.values())
    assert result.exit_code == (1 if damaged else 0), result.output
    return rows


def assert_bad(result, *words: str) -> str:
    """Exit 2 with exactly one line on stderr, `error: ...`, holding every word; never a traceback.
    Returns that line."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Content hashes of every file under `root` (lock files, which hold no data, excluded)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".lock"}


def chunk_files(array: Path) -> dict[str, bytes]:
    """Every file of a Zarr array (or any folder), by relative path: byte-identity of two arrays."""
    return {str(p.relative_to(array)): p.read_bytes() for p in sorted(array.rglob("*")) if p.is_file()}


def copy_project(src: Path, dst: Path, keep: tuple[str, ...]) -> Path:
    """A copy of project `src` at `dst` with only vfx.toml and the stage folders `keep`."""
    dst.mkdir()
    shutil.copy(src / "vfx.toml", dst / "vfx.toml")
    for folder in keep:
        shutil.copytree(src / folder, dst / folder)
    return dst


def done_markers(folder: Path) -> int:
    """How many units of the stage folder are marked done."""
    return len(list((folder / ".done").glob("*.json"))) if (folder / ".done").is_dir() else 0


def kill_after_markers(command: list[str], folder: Path, count: int, timeout: float = 240, jitter: float = 0.0,
                       env: dict | None = None) -> None:
    """Start `command` in its own session; once `folder` holds `count` done markers (or the command
    ended, or `timeout` passed), wait `jitter` seconds more, then SIGKILL its whole process group."""
    proc = subprocess.Popen(command, env=env or cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and done_markers(folder) < count:
        time.sleep(0.01)
    time.sleep(jitter)
    with contextlib.suppress(ProcessLookupError):  # a fast stage may have finished already
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def tiny_pipe(model: str = "tiny"):
    """The embedded tiny pipeline on the CPU in float32."""
    import torch

    from vfx.models import load_pipeline, resolve_model

    return load_pipeline(resolve_model(model), torch.device("cpu"), torch.float32)


def make_lora(folder: Path, seed: int = 0, model: str = "tiny") -> Path:
    """LoRA layers with non-zero weights on the attention of `model`'s UNet, saved the way diffusers loads them."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_pipe(model).unet
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    pipeline = StableDiffusionXLPipeline if model == "tiny-xl" else StableDiffusionPipeline
    pipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


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


def pan(image: np.ndarray, shift, frames: int, size: int) -> list[np.ndarray]:
    """Frames of a camera pan: content moves by `shift` per frame (cubic resampling), centre crop."""
    import cv2

    top = (image.shape[0] - size) // 2
    out = []
    for t in range(frames):
        matrix = np.float32([[1, 0, t * shift[0]], [0, 1, t * shift[1]]])
        moved = cv2.warpAffine(image, matrix, image.shape[1::-1], flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
        out.append(moved[top : top + size, top : top + size])
    return out


def video_project(root: Path, video: Path, *init_options, stages: tuple = ("extract",)) -> Path:
    """`vfx init ROOT --video VIDEO INIT_OPTIONS`, then each of `stages` (a name, or a tuple of the
    command and its options), every one of which must succeed."""
    ok("init", root, "--video", video, *init_options)
    for stage in stages:
        command = (stage,) if isinstance(stage, str) else tuple(stage)
        ok(command[0], root, *command[1:])
    return root


def project_of(tmp_path: Path, frames: list[np.ndarray], chunk: int = 4, name: str = "proj") -> Path:
    """A project whose frames/ holds exactly `frames` (lossless PNGs, no resizing)."""
    from vfx.store import open_array

    height, width = frames[0].shape[:2]
    folder = image_folder(tmp_path / f"{name}-images", frames)
    root = video_project(tmp_path / name, folder, "--size", f"{width}x{height}", "--chunk-frames", chunk)
    assert np.array_equal(np.asarray(open_array(root / "frames" / "frames.zarr")), np.stack(frames))
    return root


EDIT_STEPS = 3  # denoising steps of the edit tests' inversions and edits


def inverted(tmp_path: Path, frames: list[np.ndarray], model: str = "tiny", name: str = "p",
             steps: int = EDIT_STEPS) -> Path:
    """A project whose frames are `frames` (exact, via PNGs), encoded and inverted with `steps` steps."""
    folder = image_folder(tmp_path / f"{name}-frames", frames)
    size = f"{frames[0].shape[1]}x{frames[0].shape[0]}"
    return video_project(tmp_path / name, folder, "--size", size, "--chunk-frames", "4", "--model", model,
                         stages=("extract", "encode",
                                 ("invert", "--steps", steps, "--save-steps", steps, "--no-reconstruction")))


def run_edit(root: Path, *extra) -> dict:
    """`vfx edit ROOT --prompt 'a red robot' --steps EDIT_STEPS --json EXTRA`, which must succeed."""
    return ok_json("edit", root, "--prompt", "a red robot", "--steps", EDIT_STEPS, *extra)


def assert_static_edit(root: Path) -> None:
    """An edit (batches of 3) of a project whose 6 frames are one image gives 6 identical frames, changed."""
    import zarr

    result = run_edit(root, "--batch-size", "3", "--name", "static")
    out = edited(root, "static")
    source = np.asarray(zarr.open_array(str(root / "latents" / "latents.zarr")))
    assert out.shape == (6, 4, 8, 8) and np.isfinite(out).all()
    assert np.abs(out - source).max() > 1e-3, "the edit must change the latents"
    # Identical frames in batches of another composition differ by float rounding only, amplified by
    # the UNet steps under guidance 7.5: measured 49-65 (tiny), 72 (tiny-xl), 76 (tiny-depth) float32
    # eps of the latents' scale, so k = 128.
    rounding = 128 * np.finfo(np.float32).eps * np.abs(out).max()
    for frame in out[1:]:
        assert np.abs(frame - out[0]).max() <= rounding
    assert result["unet_frame_evaluations"] == 3 * 6 * EDIT_STEPS  # 3N per step: keyframes are not evaluated twice


def assert_every_frame_edited(root: Path, count: int) -> None:
    """An edit of the project's `count` frames denoises every one of them."""
    import zarr

    run_edit(root, "--name", "e")
    out = edited(root, "e")
    start = np.asarray(zarr.open_array(str(root / "inversion" / "trajectory.zarr"))[1])  # first editing timestep
    assert out.shape[0] == count and np.isfinite(out).all()
    changed = np.abs(out - start).reshape(count, -1).max(axis=1)
    assert (changed > 1e-3).all(), "every frame is denoised"


def assert_killed_edit_resumes(root: Path, clean: Path | None = None) -> None:
    """A 10-step edit `k` SIGKILLed after 3 finished steps resumes from there to the bytes of an
    uninterrupted edit (`clean`'s edit `k`, or a fresh one here)."""
    args = ("--prompt", "a red robot", "--steps", "10", "--name")
    kill_after_markers(vfx_command("edit", root, *args, "k"), root / "edits" / "k", 3)
    finished = done_markers(root / "edits" / "k")
    assert 3 <= finished < 10
    assert ok_json("edit", root, *args, "k")["computed_steps"] == 10 - finished
    if clean is None:
        clean = root
        ok("edit", root, *args, "fresh")
    assert edited(root, "k").tobytes() == edited(clean, "fresh" if clean is root else "k").tobytes()
    assert not (root / "edits" / "k" / "work-0.zarr").exists()


def edited(root: Path, name: str) -> np.ndarray:
    """The latents of edit `name`."""
    import zarr

    return np.asarray(zarr.open_array(str(root / "edits" / name / "latents.zarr")))


def edit_step(pipe, frames: np.ndarray, keyframes: list[int], trace: dict | None = None, correspondences=None):
    """One TokenFlow editing step (t 501 -> 401) over in-memory latents of `frames`, the clean latents
    standing in for the source branch; `trace` collects the matched tokens per layer."""
    import torch

    from vfx.diffusion.ddim import Schedule
    from vfx.diffusion.text import encode_prompt
    from vfx.diffusion.tokenflow import Embeddings, StepIO, TokenFlowEditor
    from vfx.stages.encode import encode_frames

    latents = encode_frames(pipe.vae, frames, torch.device("cpu"), 8)
    out = np.zeros_like(latents)
    emb = encode_prompt(pipe, "")
    editor = TokenFlowEditor(pipe.unet, Schedule.from_pipeline(pipe), Embeddings(emb, emb, emb), 7.5,
                             "distance", len(frames), torch.device("cpu"), correspondences=correspondences, trace=trace)
    io = StepIO(lambda s, e: latents[s:e], lambda idx: latents[idx], lambda s, e: latents[s:e],
                lambda idx: latents[idx], lambda s, e, a: out.__setitem__(slice(s, e), a))
    with editor.hooked():
        editor.step(io, len(frames), len(frames), keyframes, 501, 401)
    return out


@pytest.fixture
def gen_video(tmp_path) -> Path:
    from vfx.media import synthetic_video

    return synthetic_video(tmp_path / "clip.mp4", frames=12, size=64, fps=12)


@pytest.fixture
def project(tmp_path, gen_video) -> Path:
    """An initialised project on a 12-frame 64x64 generated clip, chunks of 4 frames."""
    return video_project(tmp_path / "proj", gen_video, "--size", "64x64", "--chunk-frames", "4", stages=())


@pytest.fixture
def encoded(project) -> Path:
    for stage in ("extract", "encode"):
        ok(stage, project)
    return project


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared test data not found at {path}")
    return path
