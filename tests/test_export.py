"""`vfx export` and `--lora` with other tools' files: every export loads back through diffusers' own
loaders and gives the images `vfx sample` made for the same seed."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_bad, invoke, ok, snapshot, tiny_pipe
from dreambooth_helpers import PROMPT, make_photos, make_project, run_dir, train_args
from vfx.media import read_image

STEPS, SIDE = 2, 64
SAMPLE = ["--prompt", PROMPT, "--num-images", "1", "--steps", str(STEPS)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A full run and a LoRA run, both with the text encoder trained, each sampled once by vfx."""
    base = tmp_path_factory.mktemp("export")
    root = make_project(base / "proj")
    photos = make_photos(base / "photos", 2)
    ok(*train_args(root, "full", photos, "--train-text-encoder", steps=2))
    ok(*train_args(root, "lora", photos, "--mode", "lora", "--train-text-encoder", "--learning-rate", "1e-2",
                   "--rank", "2", "--lora-alpha", "4", steps=2))
    for name in ("full", "lora"):
        ok("sample", root, "--name", name, *SAMPLE)
    return root


def sampled(root, name: str, folder: str = "samples") -> np.ndarray:
    return read_image(run_dir(root, name) / folder / "000-000.png")


def image_of(pipe) -> np.ndarray:
    from vfx.dreambooth.images import generate

    return generate(pipe, [PROMPT], [0], steps=STEPS, guidance=7.5, width=SIDE, height=SIDE)[0]


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    # Another loader may order the same float32 sums differently: at most 1/255 apart.
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_kohya_export_has_kohya_names_alphas_and_metadata_and_loads_in_diffusers(runs, tmp_path):
    out = tmp_path / "zwx.safetensors"
    ok("export", runs, "--name", "lora", "--format", "kohya", "--out", out)
    state = load_file(str(out))
    downs = [k for k in state if k.endswith(".lora_down.weight")]
    assert downs and all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in state)
    assert any(k.startswith("lora_te_") for k in downs) and any(k.startswith("lora_unet_") for k in downs)
    for key in downs:
        module = key.removesuffix(".lora_down.weight")
        assert float(state[f"{module}.alpha"]) == state[key].shape[0] == 2  # alpha/rank folded in: alpha = rank
        assert f"{module}.lora_up.weight" in state
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "2"
    assert meta["ss_base_model_version"] == "sd_v1"

    pipe = tiny_pipe()
    pipe.load_lora_weights(str(tmp_path), weight_name=out.name)  # diffusers' kohya conversion
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder"}
    assert_same_image(image_of(pipe), sampled(runs, "lora"))


@pytest.fixture(scope="module")
def sd2_run(tmp_path_factory):
    """A full run on the SD 2.x-shaped model (OpenCLIP-style text encoder, v-prediction), sampled once."""
    base = tmp_path_factory.mktemp("export-v")
    root = make_project(base / "proj", model="tiny-v")
    ok(*train_args(root, "full", make_photos(base / "photos", 2), "--train-text-encoder", steps=1))
    ok("sample", root, "--name", "full", *SAMPLE)
    return root


@pytest.mark.parametrize("variant, text_prefix", [("tiny", "cond_stage_model.transformer."),
                                                  ("tiny-v", "cond_stage_model.model.")])
def test_checkpoint_export_loads_with_from_single_file(request, tmp_path, variant, text_prefix):
    from diffusers import StableDiffusionPipeline

    from vfx.models import tiny_model_dir

    root = request.getfixturevalue("runs" if variant == "tiny" else "sd2_run")
    out = tmp_path / "zwx-full.safetensors"
    ok("export", root, "--name", "full", "--format", "checkpoint", "--out", out)
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", text_prefix)) for k in keys)
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_model_dir(variant)),
                                                    local_files_only=True, safety_checker=None,
                                                    requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ours = StableDiffusionPipeline.from_pretrained(str(run_dir(root, "full") / "weights"))
    for component in ("unet", "vae", "text_encoder"):  # every tensor came through the key map
        loaded, trained = getattr(pipe, component).state_dict(), getattr(ours, component).state_dict()
        assert loaded.keys() == trained.keys()
        assert all(torch.equal(loaded[k], trained[k]) for k in loaded), component
    assert_same_image(image_of(pipe), sampled(root, "full"))


def test_a_lora_trained_on_a_single_file_exports_to_kohya(sd2_run, tmp_path):
    """The base's architecture then comes from the file's tensor names (SD 2.x: OpenCLIP)."""
    from vfx.models import tiny_model_dir

    base = tmp_path / "sd2-base.safetensors"
    ok("export", sd2_run, "--name", "full", "--format", "checkpoint", "--out", base)
    ok(*train_args(sd2_run, "on-file", make_photos(tmp_path / "photos", 2), "--mode", "lora", "--model", base,
                   "--model-config", tiny_model_dir("tiny-v"), steps=1))
    out = tmp_path / "on-file.safetensors"
    ok("export", sd2_run, "--name", "on-file", "--format", "kohya", "--out", out)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sd_v2" and any(k.startswith("lora_unet_") for k in f.keys())


class _WritesAFile:
    """Unpickling this creates a file: the mark that something opened the pickle."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_lora_trained_on_a_pickled_base_exports_without_opening_it(sd2_run, tmp_path):
    """Training (with --allow-pickle) records the base's architecture, so the export reads no base model:
    replaced by a pickle that acts when loaded, the base is never unpickled, the metadata still says
    SD 2.x, and with the base gone the export still works."""
    from vfx.models import tiny_model_dir

    single = tmp_path / "sd2-base.safetensors"
    ok("export", sd2_run, "--name", "full", "--format", "checkpoint", "--out", single)
    base = tmp_path / "sd2-base.ckpt"
    torch.save({"state_dict": load_file(str(single))}, base)
    ok(*train_args(sd2_run, "on-ckpt", make_photos(tmp_path / "photos", 2), "--mode", "lora", "--model", base,
                   "--model-config", tiny_model_dir("tiny-v"), "--allow-pickle", steps=1))
    marker = tmp_path / "unpickled"
    torch.save(_WritesAFile(marker), base)
    out = tmp_path / "on-ckpt.safetensors"
    ok("export", sd2_run, "--name", "on-ckpt", "--format", "kohya", "--out", out)
    assert not marker.exists()
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sd_v2" and any(k.startswith("lora_unet_") for k in f.keys())
    base.unlink()  # a base that has moved
    ok("export", sd2_run, "--name", "on-ckpt", "--format", "kohya", "--out", out, "--force")


def test_a_lora_on_a_pickled_single_file_samples_with_the_config_it_was_trained_with(sd2_run, tmp_path):
    """`vfx sample` loads the run's base as training did: with the --model-config recorded then (none given
    here), and only with --allow-pickle; the image is diffusers' own for that file, config and LoRA."""
    from diffusers import StableDiffusionPipeline

    from vfx.models import tiny_model_dir

    single = tmp_path / "sd2-base.safetensors"
    ok("export", sd2_run, "--name", "full", "--format", "checkpoint", "--out", single)
    base = tmp_path / "sd2-base.ckpt"
    torch.save({"state_dict": load_file(str(single))}, base)
    ok(*train_args(sd2_run, "on-ckpt-sampled", make_photos(tmp_path / "photos", 2), "--mode", "lora", "--model", base,
                   "--model-config", tiny_model_dir("tiny-v"), "--allow-pickle", "--learning-rate", "1e-2", steps=1))
    assert_bad(invoke("sample", sd2_run, "--name", "on-ckpt-sampled", *SAMPLE), "--allow-pickle")
    assert not (run_dir(sd2_run, "on-ckpt-sampled") / "samples").exists()
    ok("sample", sd2_run, "--name", "on-ckpt-sampled", *SAMPLE, "--allow-pickle")
    pipe = StableDiffusionPipeline.from_single_file(str(base), config=str(tiny_model_dir("tiny-v")),
                                                    local_files_only=True, safety_checker=None,
                                                    requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(run_dir(sd2_run, "on-ckpt-sampled") / "weights"))
    assert_same_image(image_of(pipe), sampled(sd2_run, "on-ckpt-sampled"))


def test_diffusers_exports_load_with_diffusers(runs, tmp_path):
    from diffusers import StableDiffusionPipeline

    ok("export", runs, "--name", "lora", "--format", "diffusers", "--out", tmp_path / "lora.safetensors")
    pipe = tiny_pipe()
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    assert_same_image(image_of(pipe), sampled(runs, "lora"))

    ok("export", runs, "--name", "full", "--format", "diffusers", "--out", tmp_path / "full")
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (tmp_path / "full" / "tokenizer").iterdir()}
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "full"))
    pipe.set_progress_bar_config(disable=True)
    assert_same_image(image_of(pipe), sampled(runs, "full"))


def test_lora_takes_kohya_and_peft_files(runs, tmp_path):
    """`--lora` goes through diffusers' loader: a kohya export and a peft-layout file sample the same images."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    kohya = tmp_path / "kohya.safetensors"
    ok("export", runs, "--name", "lora", "--format", "kohya", "--out", kohya)
    trained = load_file(str(run_dir(runs, "lora") / "weights" / "pytorch_lora_weights.safetensors"))
    unet = convert_unet_state_dict_to_peft({k[5:]: v for k, v in trained.items() if k.startswith("unet.")})
    text = convert_state_dict_to_peft({k[13:]: v for k, v in trained.items() if k.startswith("text_encoder.")})
    peft = tmp_path / "peft.safetensors"
    save_file({**{f"unet.{k}": v for k, v in unet.items()}, **{f"text_encoder.{k}": v for k, v in text.items()}},
              str(peft))
    for file in (kohya, peft):
        ok("sample", runs, "--name", "lora", *SAMPLE, "--lora", file, "--force")
        assert_same_image(sampled(runs, "lora"), image_of(lora_pipe(runs)))


def lora_pipe(root):
    pipe = tiny_pipe()
    pipe.load_lora_weights(str(run_dir(root, "lora") / "weights"))
    return pipe


def test_a_lora_with_no_usable_layers_is_refused_and_changes_nothing(runs, tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"model.layers.0.mlp.lora_A.weight": torch.zeros(2, 8),
               "model.layers.0.mlp.lora_B.weight": torch.zeros(8, 2)}, str(foreign))
    before = snapshot(runs)
    assert_bad(invoke("sample", runs, "--name", "lora", *SAMPLE, "--lora", foreign, "--force"), "foreign.safetensors")
    assert snapshot(runs) == before


@pytest.mark.parametrize("name, fmt, words", [("full", "kohya", "full fine-tune"), ("lora", "checkpoint", "LoRA"),
                                              ("lora", "onnx", "--format")])
def test_an_export_that_does_not_fit_the_run_is_refused(runs, tmp_path, name, fmt, words):
    assert_bad(invoke("export", runs, "--name", name, "--format", fmt, "--out", tmp_path / "x.safetensors"), words)
    assert list(tmp_path.iterdir()) == []


def test_an_export_never_overwrites_without_force_nor_writes_through_a_link(runs, tmp_path):
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"a user's file")
    assert_bad(invoke("export", runs, "--name", "lora", "--out", out), "--force")
    assert out.read_bytes() == b"a user's file"
    ok("export", runs, "--name", "lora", "--out", out, "--force")
    assert any(k.startswith("lora_unet_") for k in load_file(str(out)))

    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes(b"keep")
    link = tmp_path / "link.safetensors"
    link.symlink_to(elsewhere)
    assert_bad(invoke("export", runs, "--name", "lora", "--out", link, "--force"), "symbolic link")
    assert elsewhere.read_bytes() == b"keep"
    assert_bad(invoke("export", runs, "--name", "lora", "--out", tmp_path / "x.ckpt"), ".safetensors")
    assert json.loads(ok("export", runs, "--name", "lora", "--out", out, "--force", "--json").stdout)["format"] == "kohya"


COMPAT_PYTHON = os.environ.get("VFX_COMPAT_PYTHON")


@pytest.mark.slow
@pytest.mark.skipif(not COMPAT_PYTHON, reason="VFX_COMPAT_PYTHON names no older stack (`make test` builds one)")
def test_every_export_loads_in_an_older_stack_and_gives_the_same_images(runs, tmp_path):
    """diffusers 0.31 with transformers 4.57 (tests/compat/requirements.txt) loads vfx's LoRA (UNet and
    text encoder), its full folder and every export, and draws what `vfx sample` drew."""
    from vfx.models import tiny_model_dir

    versions = subprocess.run([COMPAT_PYTHON, "-c", "import diffusers, transformers; "
                               "print(diffusers.__version__, transformers.__version__)"],
                              capture_output=True, text=True, check=True).stdout.split()
    assert versions[0].startswith("0.3") and versions[1].startswith("4."), versions
    ok("export", runs, "--name", "lora", "--format", "kohya", "--out", tmp_path / "kohya.safetensors")
    ok("export", runs, "--name", "full", "--format", "checkpoint", "--out", tmp_path / "full.safetensors")
    base = str(tiny_model_dir())
    jobs = {
        "lora": ("lora", run_dir(runs, "lora") / "weights" / "pytorch_lora_weights.safetensors", "lora"),
        "kohya": ("lora", tmp_path / "kohya.safetensors", "lora"),
        "folder": ("folder", run_dir(runs, "full") / "weights", "full"),
        "checkpoint": ("checkpoint", tmp_path / "full.safetensors", "full"),
    }
    spec = [{"kind": kind, "path": str(path), "base": base, "prompt": PROMPT, "steps": STEPS, "size": SIDE,
             "out": str(tmp_path / f"{name}.npy")} for name, (kind, path, _) in jobs.items()]
    (tmp_path / "jobs.json").write_text(json.dumps(spec))
    script = Path(__file__).parent / "compat" / "generate.py"
    done = subprocess.run([COMPAT_PYTHON, str(script), str(tmp_path / "jobs.json")], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lora loaded: adapters {'unet': ['default_0'], 'text_encoder': ['default_0']}" in done.stdout
    for name, (_, _, run) in jobs.items():
        assert_same_image(np.load(tmp_path / f"{name}.npy"), sampled(runs, run))
