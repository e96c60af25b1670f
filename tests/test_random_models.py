"""`vfx model random`: the shipped configs are the real architectures (counted on the meta device, nothing
allocated), and the writer makes a loadable, deterministic pipeline folder (shown on the same configs
scaled down to toy width: a real-size build takes gigabytes)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import assert_bad, invoke, ok, ok_json
from vfx import random_models
from vfx.random_models import build_text_encoder, build_unet, build_vae, count_parameters, load_configs

# Parameter counts of the public checkpoints.
REAL_COUNTS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}
BUILDERS = {"unet": build_unet, "vae": build_vae, "text_encoder": build_text_encoder, "text_encoder_2": build_text_encoder}


@pytest.mark.parametrize("arch", sorted(REAL_COUNTS))
def test_shipped_configs_have_the_real_parameter_counts(arch):
    from accelerate import init_empty_weights

    configs = load_configs(arch)
    counts = {}
    with init_empty_weights():
        for name, build in BUILDERS.items():
            if f"{name}/config.json" in configs:
                module = build(configs[f"{name}/config.json"])
                assert {p.device.type for p in module.parameters()} == {"meta"}
                counts[name] = count_parameters(module)
    assert counts == REAL_COUNTS[arch]


def test_shipped_configs_describe_each_model():
    sd15, sd21, sdxl = (load_configs(arch) for arch in ("sd15", "sd21", "sdxl"))
    assert sd15["scheduler/scheduler_config.json"].get("prediction_type", "epsilon") == "epsilon"
    assert sd21["scheduler/scheduler_config.json"]["prediction_type"] == "v_prediction"
    assert sd21["unet/config.json"]["sample_size"] * 8 == 768 and sdxl["unet/config.json"]["sample_size"] * 8 == 1024
    assert sdxl["text_encoder_2/config.json"]["architectures"] == ["CLIPTextModelWithProjection"]
    for configs in (sd15, sd21, sdxl):
        assert {c["vocab_size"] for name, c in configs.items() if name.startswith("text_encoder")} == {49408}


def toy(configs: dict[str, dict]) -> dict[str, dict]:
    """The same configs at toy width: every structural field (block types, layers, prediction type,
    tokenizers, scheduler, SDXL's added conditioning) kept, channel counts and depths shrunk."""
    configs = copy.deepcopy(configs)
    unet = configs["unet/config.json"]
    blocks = len(unet["block_out_channels"])
    xl = "text_encoder_2/config.json" in configs
    unet.update(block_out_channels=[32, 64, 64, 64][:blocks], norm_num_groups=8)
    if isinstance(unet["attention_head_dim"], list):
        unet["attention_head_dim"] = [2, 4, 4, 4][:blocks]
    if xl:
        unet.update(transformer_layers_per_block=1, addition_time_embed_dim=8, cross_attention_dim=64,
                    projection_class_embeddings_input_dim=6 * 8 + 32)
    else:
        unet["cross_attention_dim"] = 32
    configs["vae/config.json"].update(block_out_channels=[8, 16, 32, 32], layers_per_block=1, norm_num_groups=8,
                                      sample_size=64)
    for name in ("text_encoder/config.json", "text_encoder_2/config.json"):
        if name in configs:
            configs[name].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 projection_dim=32)
    return configs


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_written_folder_loads_and_is_deterministic(tmp_path):
    from diffusers import StableDiffusionPipeline

    configs = toy(load_configs("sd15"))
    result = random_models.write_random_model("sd15", tmp_path / "a", "fp16", configs=configs)
    random_models.write_random_model("sd15", tmp_path / "b", "fp16", configs=configs)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left aside

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "a", local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == 32
    for weights in (tmp_path / "a").glob("*/*.safetensors"):
        assert {t.dtype for t in load_file(weights).values()} == {torch.float16}, weights
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) == 49408
    ids = pipe.tokenizer("a photo of a dog").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407  # CLIP's special token ids
    assert result["parameters"]["unet"] == count_parameters(pipe.unet)
    assert json.loads((tmp_path / "a" / random_models.MARKER).read_text())["arch"] == "sd15"


def test_sdxl_folder_loads_as_an_sdxl_pipeline(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    random_models.write_random_model("sdxl", tmp_path / "xl", "fp32", configs=toy(load_configs("sdxl")))
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "xl", local_files_only=True)
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert {t.dtype for t in load_file(tmp_path / "xl" / "unet" / "diffusion_pytorch_model.safetensors").values()} == {torch.float32}
    embeds, _, pooled, _ = pipe.encode_prompt("a dog", do_classifier_free_guidance=False)
    assert embeds.shape == (1, 77, 64) and pooled.shape == (1, 32)


def test_command_writes_refuses_and_replaces(tmp_path, monkeypatch):
    toy_sd21 = toy(load_configs("sd21"))
    monkeypatch.setattr(random_models, "load_configs", lambda arch: toy_sd21)
    out = tmp_path / "m"
    result = ok_json("model", "random", "--arch", "sd21", "--out", out, "--dtype", "fp32")
    assert result["architecture_of"] == "stabilityai/stable-diffusion-2-1" and result["dtype"] == "fp32"
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    before = folder_bytes(out)

    assert_bad(invoke("model", "random", "--arch", "sd21", "--out", out), "exists", "--force")
    ok("model", "random", "--arch", "sd21", "--out", out, "--dtype", "fp32", "--force")
    assert folder_bytes(out) == before

    (tmp_path / "link").symlink_to(out)
    assert_bad(invoke("model", "random", "--arch", "sd21", "--out", tmp_path / "link", "--force"), "symbolic link")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    assert_bad(invoke("model", "random", "--arch", "sd21", "--out", tmp_path / "notes", "--force"), "model_index.json")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert_bad(invoke("model", "random", "--arch", "sd3", "--out", tmp_path / "x"), "sd15")
    assert_bad(invoke("model", "random", "--arch", "sd21", "--out", tmp_path / "x", "--dtype", "bf16"), "fp16")
    assert not (tmp_path / "x").exists()
