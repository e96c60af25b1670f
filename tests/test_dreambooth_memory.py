"""`vfx train` memory options: gradient accumulation, 8-bit AdamW, LoRA alpha, and lean checkpoints."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_bad, invoke, ok, tiny_pipe
from dreambooth_helpers import (
    CLASS_PROMPT, PROMPT, assert_same_tensors, file_states, metrics, project_with_class_images, run_dir, train_args,
    trained_tensors, with_prior,
)

EPS64 = torch.finfo(torch.float64).eps
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


needs_bnb = pytest.mark.skipif(not has_bitsandbytes(),
                               reason="bitsandbytes is not installed (optional extra: pip install '.[bnb]')")


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """A project with generated subject photos and 2 class images (dreambooth/prior/class)."""
    return project_with_class_images(tmp_path_factory.mktemp("mem"))



def step_lines(root, name):
    return [{k: v for k, v in m.items() if k != "step_seconds"} for m in metrics(root, name) if "loss" in m]


# ---------------------------------------------------------------- gradient accumulation: exactness


def float64_trainer(root, photos, class_dir, **options):
    """A Trainer built as `vfx train` builds it, its UNet then run in float64: two ways of computing one
    step then differ only by float64 rounding. Records every UNet batch size and the gradients the
    optimizer is handed."""
    from vfx.cli.common import settings_for
    from vfx.dreambooth.config import TrainConfig
    from vfx.dreambooth.train import Train

    settings = settings_for(root, None, "cpu", None, None, False, False, None, shardable=False)
    cfg = TrainConfig(name="acc", instance_dir=photos, instance_prompt=PROMPT, class_dir=class_dir,
                      class_prompt=CLASS_PROMPT, learning_rate=1e-3, max_steps=4, random_crop=True, flip=True,
                      offset_noise=0.1, snr_gamma=5.0, lr_scheduler="cosine", lr_warmup_steps=2, eval_pairs=0,
                      **options)
    stage = Train(settings, cfg)
    stage.prepare()
    trainer = stage.trainer
    trainer.unet.double()  # in place: the optimizer keeps the same parameters, now float64
    trainer.forwards, trainer.handed = [], []

    def widen(module, args, kwargs):
        trainer.forwards.append(len(args[0]))
        wide = lambda x: x.double() if torch.is_tensor(x) and x.is_floating_point() else x  # noqa: E731
        return tuple(map(wide, args)), {k: wide(v) for k, v in kwargs.items()}

    trainer.unet.register_forward_pre_hook(widen, with_kwargs=True)
    clip, trainer.norms = trainer.accelerator.clip_grad_norm_, []
    trainer.accelerator.clip_grad_norm_ = lambda *args: trainer.norms.append(clip(*args)) or trainer.norms[-1]
    trainer.optimizer.optimizer.register_step_pre_hook(  # accelerate's wrapper holds the torch optimizer
        lambda *_: trainer.handed.append({n: p.grad.clone() for n, p in trainer.trained.items()}))
    return trainer


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e-3], ids=["no-clipping", "clipping"])
def test_accumulated_micro_batches_equal_one_large_batch(db, max_grad_norm):
    """N micro-batches of B and one batch of N·B: the same examples, crops, flips, noise and timesteps,
    the same clipped gradient handed to AdamW once, the same parameters after the step."""
    root, photos, class_dir = db
    runs = {}
    for batch, parts in ((4, 1), (2, 2), (1, 4)):
        trainer = float64_trainer(root, photos, class_dir, batch_size=batch, gradient_accumulation=parts,
                                  max_grad_norm=max_grad_norm)
        line = trainer.train_step()
        # One optimizer and one scheduler step per train step; the UNet saw micro-batches of B + B class rows.
        assert trainer.forwards == [2 * batch] * parts and len(trainer.handed) == 1
        assert len(trainer.norms) == (1 if max_grad_norm else 0)  # clipped once, the accumulated gradient
        assert trainer.step == 1 and trainer.lr_scheduler.last_epoch == 1
        runs[parts] = line, trainer.handed[0], {n: p.detach().clone() for n, p in trainer.trained.items()}
        if max_grad_norm:  # clipping acted: torch scales by max_norm / (norm + 1e-6)
            norm, handed = float(trainer.norms[0]), trainer.handed[0].values()
            assert norm > 100 * max_grad_norm
            clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in handed]))
            assert float(clipped) == pytest.approx(max_grad_norm * norm / (norm + 1e-6), rel=64 * EPS64)
    line, grads, params = runs[1]
    # Every gradient entry sums terms of the batch's examples; batches of another size run other kernel
    # blockings, so the sums round differently, by a few dozen float64 eps of the gradients' scale
    # (measured: 3.7). Bugs move them by 1e-7 of that scale or more: an unscaled micro-batch loss, draws
    # made per micro-batch, clipping per micro-batch.
    grad_scale = max(float(g.abs().max()) for g in grads.values())
    grad_rounding = 64 * EPS64 * grad_scale
    # AdamW's first update, lr·g/(|g| + ε), moves by at most lr/ε per unit of change in g; weight decay
    # and the subtraction round at the parameters' own scale (measured: equal).
    lr, adam_eps = 1e-3, 1e-8
    param_scale = max(float(p.abs().max()) for p in params.values())
    param_rounding = lr / adam_eps * grad_rounding + 4 * EPS64 * param_scale
    for parts in (2, 4):
        other_line, other_grads, other_params = runs[parts]
        assert max(float((grads[n] - other_grads[n]).abs().max()) for n in grads) <= grad_rounding
        assert max(float((params[n] - other_params[n]).abs().max()) for n in params) <= param_rounding
        for key in ("loss", "instance_loss", "prior_loss"):  # means of equal shares: the batch's mean
            assert other_line[key] == pytest.approx(line[key], rel=64 * EPS64, abs=0)
        assert other_line["lr"] == line["lr"] and other_line["epoch"] == line["epoch"]
    # Control: the comparison sees a real difference (another seed's draws).
    reseeded = float64_trainer(root, photos, class_dir, batch_size=4, max_grad_norm=max_grad_norm, seed=1)
    reseeded.train_step()
    assert max(float((grads[n] - reseeded.handed[0][n]).abs().max()) for n in grads) > 1e3 * grad_rounding


def test_resume_with_accumulation_equals_an_uninterrupted_run(db):
    root, photos, class_dir = db
    args = [*with_prior(class_dir), "--mode", "lora", "--train-text-encoder", "--gradient-accumulation", "2",
            "--random-crop", "--flip", "--lr-scheduler", "linear", "--eval-pairs", "0"]
    ok(*train_args(root, "acc-whole", photos, *args))
    ok(*train_args(root, "acc-split", photos, *args, "--stop-after", "1"))  # mid-way between checkpoints
    assert [p.name for p in (run_dir(root, "acc-split") / "checkpoints").iterdir()] == ["step-000001"]
    ok(*train_args(root, "acc-split", photos, *args, "--resume", "latest"))
    assert_same_tensors(trained_tensors(root, "acc-whole"), trained_tensors(root, "acc-split"))
    assert step_lines(root, "acc-whole") == step_lines(root, "acc-split")
    # Steps and checkpoints count optimizer steps, not micro-batches.
    assert [m["step"] for m in step_lines(root, "acc-whole")] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run_dir(root, "acc-whole") / "checkpoints").iterdir()) == [
        "step-000002", "step-000004"]


# ---------------------------------------------------------------- 8-bit AdamW


def test_adamw8bit_without_bitsandbytes_exits_2_and_touches_nothing(db, monkeypatch):
    root, photos, _ = db
    ok(*train_args(root, "no-bnb", photos, steps=2))
    before = file_states(root / "dreambooth")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails, installed or not
    result = invoke(*train_args(root, "no-bnb", photos, "--optimizer", "adamw8bit", "--force", steps=2))
    assert_bad(result, "--optimizer adamw8bit", "bitsandbytes", "pip install 'vfx[bnb]'")
    assert file_states(root / "dreambooth") == before


@needs_bnb
def test_adamw8bit_state_round_trips_through_safetensors_bitwise(tmp_path):
    """8-bit moments, their block scales and shared quantisation maps, and fp32 moments of small tensors."""
    import bitsandbytes as bnb

    from vfx.dreambooth import checkpoint

    def model():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(80, 70)),
                torch.nn.Parameter(torch.randn(10))]  # the last is below bitsandbytes' 4096-element 8-bit limit

    def grads(step):
        generator = torch.Generator().manual_seed(step)
        return [torch.randn(p.shape, generator=generator) for p in live]

    live = model()
    optimizer = bnb.optim.AdamW8bit([{"params": live[:2]}, {"params": live[2:], "lr": 1e-2}], lr=1e-3,
                                    weight_decay=1e-2)
    for step in range(3):
        for p, g in zip(live, grads(step)):
            p.grad = g
        optimizer.step()
    tensors, meta = checkpoint.optimizer_to_files(optimizer.state_dict())
    assert tensors["0.__bnb_optimizer_quant_state__.state1"].dtype == torch.uint8
    assert tensors["2.__bnb_optimizer_quant_state__.state1"].dtype == torch.float32
    save_file(tensors, str(tmp_path / "optimizer.safetensors"))
    (tmp_path / "meta.json").write_text(json.dumps(meta))

    restored_params = model()
    with torch.no_grad():
        for p, q in zip(restored_params, live):
            p.copy_(q)
    restored = bnb.optim.AdamW8bit([{"params": restored_params[:2]}, {"params": restored_params[2:]}], lr=0.5)
    restored.load_state_dict(checkpoint.optimizer_from_files(load_file(str(tmp_path / "optimizer.safetensors")),
                                                             json.loads((tmp_path / "meta.json").read_text())))
    assert restored.param_groups[1]["lr"] == 1e-2
    for step in (3, 4):
        for params in (live, restored_params):
            for p, g in zip(params, grads(step)):
                p.grad = g.clone()
        optimizer.step()
        restored.step()
    for p, q in zip(live, restored_params):
        assert torch.equal(p, q)


@needs_bnb
def test_adamw8bit_training_resumes_bitwise_exactly(db, tmp_path):
    root, photos, class_dir = db
    args = [*with_prior(class_dir), "--optimizer", "adamw8bit", "--random-crop", "--eval-pairs", "0"]
    ok(*train_args(root, "bnb-whole", photos, *args))
    ok(*train_args(root, "bnb-split", photos, *args, "--stop-after", "2"))
    saved = run_dir(root, "bnb-split") / "checkpoints" / "step-000002"
    moments = load_file(str(saved / "optimizer.safetensors"))
    assert any(t.dtype == torch.uint8 for t in moments.values())  # the UNet's large tensors have 8-bit moments
    tampered = tmp_path / "step-000002"
    shutil.copytree(saved, tampered)
    ok(*train_args(root, "bnb-split", photos, *args, "--resume", "latest"))
    assert_same_tensors(trained_tensors(root, "bnb-whole"), trained_tensors(root, "bnb-split"))
    assert step_lines(root, "bnb-whole") == step_lines(root, "bnb-split")
    # Control: the equality above depends on the restored 8-bit moments.
    moments = {k: (torch.zeros_like(v) + 128 if v.dtype == torch.uint8 else v) for k, v in moments.items()}
    save_file(moments, str(tampered / "optimizer.safetensors"))
    ok(*train_args(root, "bnb-tampered", photos, *args, "--resume", str(tampered)))
    whole, other = trained_tensors(root, "bnb-whole"), trained_tensors(root, "bnb-tampered")
    assert any(not torch.equal(whole[k], other[k]) for k in whole)


def test_resume_with_another_optimizer_or_lora_alpha_is_refused(db):
    root, photos, _ = db
    ok(*train_args(root, "alpha", photos, "--mode", "lora", "--rank", "2", "--lora-alpha", "8", "--stop-after", "1"))
    before = file_states(root / "dreambooth")
    for changed, name in ((["--lora-alpha", "2"], "lora_alpha"), (["--lora-alpha", "8", "--optimizer", "adamw8bit"],
                                                                    "optimizer")):
        if name == "optimizer" and not has_bitsandbytes():
            continue  # refused earlier, for want of bitsandbytes (tested above)
        result = invoke(*train_args(root, "alpha", photos, "--mode", "lora", "--rank", "2", *changed,
                                    "--resume", "latest"))
        assert_bad(result, name)
        assert file_states(root / "dreambooth") == before


# ---------------------------------------------------------------- LoRA alpha


def test_lora_alpha_scales_the_layers_and_is_recorded(db):
    from vfx.dreambooth.config import TrainConfig
    from vfx.dreambooth.train import set_trainable

    root, photos, _ = db
    pipe = tiny_pipe()
    cfg = TrainConfig(name="a", instance_dir=photos, instance_prompt=PROMPT, mode="lora", rank=2, lora_alpha=8,
                      train_text_encoder=True).resolved(64, 0, torch.device("cpu"))
    set_trainable(pipe, cfg, torch.float32)
    layers = [m for model in (pipe.unet, pipe.text_encoder) for m in model.modules() if hasattr(m, "scaling")]
    assert layers and all(m.scaling["default"] == 8 / 2 for m in layers)
    default = TrainConfig(name="a", instance_dir=photos, instance_prompt=PROMPT, rank=3).resolved(64, 0,
                                                                                                    torch.device("cpu"))
    assert default.lora_alpha == 3  # alpha = rank unless given
    ok(*train_args(root, "alpha-done", photos, "--mode", "lora", "--rank", "2", "--lora-alpha", "8", steps=1))
    info = json.loads((run_dir(root, "alpha-done") / "weights" / "dreambooth.json").read_text())
    assert info["rank"] == 2 and info["lora_alpha"] == 8


# ---------------------------------------------------------------- checkpoints hold only what resume needs


def attention_projections(model, targets) -> list[str]:
    return [name for name, module in model.named_modules() if name.endswith(targets)
            and isinstance(module, torch.nn.Linear)]


def test_checkpoints_hold_only_the_trained_parameters(db):
    root, photos, _ = db
    base = tiny_pipe()
    ok(*train_args(root, "lean-lora", photos, "--mode", "lora", "--train-text-encoder", steps=2))
    ok(*train_args(root, "lean-full", photos, steps=2))
    ok(*train_args(root, "lean-full-te", photos, "--train-text-encoder", steps=2))

    def saved(name):
        folder = run_dir(root, name) / "checkpoints" / "step-000002"
        optimizer = load_file(str(folder / "optimizer.safetensors"))
        return set(load_file(str(folder / "trainable.safetensors"))), {k.split(".")[0] for k in optimizer}

    lora, lora_states = saved("lean-lora")
    expected = {f"{prefix}.{layer}.lora_{ab}.default.weight" for prefix, model, targets in (
        ("unet", base.unet, UNET_TARGETS), ("text_encoder", base.text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj")))
        for layer in attention_projections(model, targets) for ab in "AB"}
    assert lora == expected  # the LoRA layers only: no frozen UNet, text encoder or VAE weight
    assert len(lora_states) == len(expected)  # optimizer state for those tensors only
    unet = {f"unet.{n}" for n, _ in base.unet.named_parameters()}
    text = {f"text_encoder.{n}" for n, _ in base.text_encoder.named_parameters()}
    assert saved("lean-full")[0] == unet
    assert saved("lean-full-te")[0] == unet | text


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize("extra, words", [
    (["--gradient-accumulation", "0"], ["--gradient-accumulation 0"]),
    (["--optimizer", "sgd"], ["--optimizer 'sgd'", "adamw8bit"]),
    (["--lora-alpha", "0"], ["--lora-alpha 0"]),
], ids=["accumulation", "optimizer", "alpha"])
def test_bad_memory_options_exit_2(db, extra, words):
    root, photos, _ = db
    before = file_states(root / "dreambooth")
    assert_bad(invoke(*train_args(root, "bad", photos, *extra, steps=2)), *words)
    assert file_states(root / "dreambooth") == before
