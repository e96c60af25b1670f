"""The DreamBooth commands: regularize, train, sample, tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vfx.cli import app
from vfx.cli.common import (
    AllowPickleOpt, DeviceOpt, DtypeOpt, ForceOpt, JsonOpt, ModelConfigOpt, ModelOpt, ProjectDir, ShardOpt, command, emit,
    report, settings_for,
)

RunOpt = Annotated[str, typer.Option("--name", help="Run name: everything goes to dreambooth/NAME/ in the project.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed. Default: vfx.toml (0).", show_default=False)]
StepsOpt = Annotated[int, typer.Option("--steps", help="Denoising steps per image.")]
GuidanceOpt = Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale (1 turns it off).")]
NegativeOpt = Annotated[str, typer.Option("--negative-prompt", help="Negative prompt (the unconditional half of guidance).")]
SizeOpt = Annotated[
    int | None,
    typer.Option("--size", help="Image side in pixels (square, multiple of 8). Default: the model's native size.", show_default=False),
]


def training_settings(*args, **kwargs):
    """`settings_for`, refusing a depth model (`vfx sample` checks the model it samples instead: a run's
    base, trained elsewhere, in a project whose own model reads depth)."""
    from vfx.dreambooth.data import refuse_depth_model

    settings = settings_for(*args, **kwargs)
    refuse_depth_model(settings)
    return settings


@command(app, "regularize")
def regularize_cmd(
    root: ProjectDir,
    name: RunOpt,
    class_prompt: Annotated[str, typer.Option("--class-prompt", help="The class the subject belongs to, e.g. 'a photo of a dog'.")],
    num_images: Annotated[int, typer.Option("--num-images", help="Class images to make (the paper uses 200-1000).")] = 100,
    steps: StepsOpt = 50,
    guidance: GuidanceOpt = 7.5,
    seed: SeedOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per pipeline call; part of the cache key.")] = 4,
    size: SizeOpt = None,
    negative_prompt: NegativeOpt = "",
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    allow_pickle: AllowPickleOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    shard: ShardOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Make class-prior images with the base model into dreambooth/NAME/class/ (cached; sharded by image group)."""
    from vfx.dreambooth.regularize import regularize

    settings = training_settings(root, model, device, dtype, shard, force, allow_pickle, model_config)
    result = regularize(settings, name, class_prompt, num_images, steps=steps, guidance=guidance, seed=seed,
                        batch_size=batch_size, size=size, negative_prompt=negative_prompt)
    report(result, as_json)


@command(app, "train")
def train_cmd(
    root: ProjectDir,
    name: RunOpt,
    instance_dir: Annotated[Path, typer.Option("--instance-dir", help="Folder of 3-5 photos of the subject.")],
    instance_prompt: Annotated[str, typer.Option("--instance-prompt", help="Prompt with the identifier, e.g. 'a photo of zwx dog'.")],
    class_prompt: Annotated[str | None, typer.Option("--class-prompt", help="Class prompt for the prior loss. Default: the one `vfx regularize` used for this run, if any.", show_default=False)] = None,
    class_dir: Annotated[Path | None, typer.Option("--class-dir", help="Use this folder of class images instead of dreambooth/NAME/class/ (needs --class-prompt).", show_default=False)] = None,
    prior_loss_weight: Annotated[float, typer.Option("--prior-loss-weight", help="λ in MSE(instance) + λ·MSE(class); 0 turns the prior loss off.")] = 1.0,
    identifier: Annotated[str | None, typer.Option("--identifier", help="The identifier token, to check the instance prompt holds it as one token.", show_default=False)] = None,
    mode: Annotated[str, typer.Option("--mode", help="full: fine-tune the UNet; lora: train LoRA layers only.")] = "full",
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank.")] = 4,
    lora_alpha: Annotated[float | None, typer.Option("--lora-alpha", help="LoRA alpha: the layers' output is scaled by alpha / rank. Default: --rank.", show_default=False)] = None,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", help="Dropout on the LoRA layers.")] = 0.0,
    train_text_encoder: Annotated[bool, typer.Option("--train-text-encoder", help="Train the text encoder too (full, or LoRA in lora mode).")] = False,
    learning_rate: Annotated[float | None, typer.Option("--learning-rate", help="UNet learning rate. Default: 5e-6 (full), 1e-4 (lora).", show_default=False)] = None,
    text_encoder_lr: Annotated[float | None, typer.Option("--text-encoder-lr", help="Text encoder learning rate. Default: --learning-rate.", show_default=False)] = None,
    lr_scheduler: Annotated[str, typer.Option("--lr-scheduler", help="constant | constant_with_warmup | linear | cosine | cosine_with_restarts | polynomial.")] = "constant",
    lr_warmup_steps: Annotated[int, typer.Option("--lr-warmup-steps", help="Warm-up steps of the LR scheduler.")] = 0,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Training steps. Default: 400 (full), 500 (lora).", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Instance examples per micro-batch and process (as many class examples join them).")] = 1,
    gradient_accumulation: Annotated[int, typer.Option("--gradient-accumulation", help="Micro-batches per optimizer step: the step sees batch-size x N examples, memory holds batch-size.")] = 1,
    resolution: Annotated[int | None, typer.Option("--resolution", help="Training side in pixels. Default: the model's native size.", show_default=False)] = None,
    random_crop: Annotated[bool, typer.Option("--random-crop/--center-crop", help="Crop instance photos at random places, or at the centre.")] = False,
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Mirror instance photos at random.")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations in the backward pass: less memory, slower.")] = False,
    mixed_precision: Annotated[str, typer.Option("--mixed-precision", help="no | fp16 (GPU) | bf16.")] = "no",
    snr_gamma: Annotated[float | None, typer.Option("--snr-gamma", help="Min-SNR-γ loss weighting (5.0 is usual). Default: off.", show_default=False)] = None,
    offset_noise: Annotated[float, typer.Option("--offset-noise", help="Offset-noise strength (0.05-0.1 is usual).")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Gradient clipping norm (0: off).")] = 1.0,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = 1e-2,
    optimizer: Annotated[str, typer.Option("--optimizer", help="adamw | adamw8bit (bitsandbytes, pip install 'vfx[bnb]'): 8-bit moments, about a quarter of AdamW's state.")] = "adamw",
    seed: SeedOpt = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Save the full training state every N steps.")] = 100,
    keep: Annotated[int, typer.Option("--keep", help="Checkpoints to keep (the newest).")] = 2,
    resume: Annotated[str | None, typer.Option("--resume", help="'latest' or a checkpoint folder: continue exactly where it stopped.", show_default=False)] = None,
    stop_after: Annotated[int | None, typer.Option("--stop-after", help="Stop (with a checkpoint) after N steps in this invocation, e.g. to fit a job's time limit.", show_default=False)] = None,
    validation_prompt: Annotated[str | None, typer.Option("--validation-prompt", help="Sample this prompt during training into dreambooth/NAME/validation/.", show_default=False)] = None,
    validation_every: Annotated[int | None, typer.Option("--validation-every", help="Steps between validations. Default: --checkpoint-every.", show_default=False)] = None,
    validation_images: Annotated[int, typer.Option("--validation-images", help="Images per validation.")] = 2,
    validation_steps: Annotated[int, typer.Option("--validation-steps", help="Denoising steps per validation image.")] = 25,
    eval_pairs: Annotated[int, typer.Option("--eval-pairs", help="Fixed (noise, timestep) pairs per photo for the logged evaluation loss (0: off).")] = 4,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    allow_pickle: AllowPickleOpt = False,
    device: DeviceOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Train from step 0 even when up to date; deletes the run's checkpoints.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune the model on a subject (DreamBooth) into dreambooth/NAME/weights/, with checkpoints and exact resume."""
    from vfx.dreambooth.config import TrainConfig
    from vfx.dreambooth.train import train

    settings = training_settings(root, model, device, None, None, force, allow_pickle, model_config, shardable=False)
    cfg = TrainConfig(
        name=name, instance_dir=instance_dir, instance_prompt=instance_prompt, class_prompt=class_prompt,
        class_dir=class_dir, prior_loss_weight=prior_loss_weight, identifier=identifier, mode=mode, rank=rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, train_text_encoder=train_text_encoder, learning_rate=learning_rate,
        text_encoder_lr=text_encoder_lr, lr_scheduler=lr_scheduler, lr_warmup_steps=lr_warmup_steps,
        max_steps=max_steps, batch_size=batch_size, gradient_accumulation=gradient_accumulation,
        optimizer=optimizer, resolution=resolution, random_crop=random_crop, flip=flip,
        gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision, snr_gamma=snr_gamma,
        offset_noise=offset_noise, max_grad_norm=max_grad_norm, weight_decay=weight_decay, seed=seed,
        checkpoint_every=checkpoint_every, keep=keep, resume=resume, stop_after=stop_after,
        validation_prompt=validation_prompt, validation_every=validation_every,
        validation_images=validation_images, validation_steps=validation_steps, eval_pairs=eval_pairs,
    )
    result = train(settings, cfg)
    if not result.get("main_process", True):
        return  # under `accelerate launch`, the main process reports
    if result.get("up_to_date"):
        text = "train: up to date"
    elif result["state"] == "complete":
        text = f"train: complete at step {result['step']}; weights in {result['weights']}"
    else:
        text = f"train: stopped at step {result['step']} of {result['max_steps']}; continue with --resume latest"
    emit(result, as_json, text)


@command(app, "sample")
def sample_cmd(
    root: ProjectDir,
    name: RunOpt,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A prompt (repeatable).", show_default=False)] = None,
    prompts_file: Annotated[Path | None, typer.Option("--prompts-file", help="One prompt per line (# comments).", show_default=False)] = None,
    num_images: Annotated[int, typer.Option("--num-images", help="Images per prompt.")] = 4,
    steps: StepsOpt = 50,
    guidance: GuidanceOpt = 7.5,
    seed: SeedOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per pipeline call.")] = 4,
    size: SizeOpt = None,
    negative_prompt: NegativeOpt = "",
    base: Annotated[bool, typer.Option("--base", help="Sample the base model (the run's, or --model) instead of the run's weights, into samples-base/.")] = False,
    lora: Annotated[Path | None, typer.Option("--lora", help="Sample --model with this LoRA instead of the run's weights: a .safetensors file in any layout diffusers loads (diffusers, peft, kohya/A1111).", show_default=False)] = None,
    lora_scale: Annotated[float, typer.Option("--lora-scale", help="LoRA strength (0: the base model).")] = 1.0,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    allow_pickle: AllowPickleOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    shard: ShardOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Sample prompts with a run's trained weights (full or LoRA) or the base model into dreambooth/NAME/samples/."""
    from vfx.dreambooth.sample import read_prompts_file, sample

    prompts = list(prompt or []) + (read_prompts_file(prompts_file) if prompts_file else [])
    settings = settings_for(root, model, device, dtype, shard, force, allow_pickle, model_config)
    result = sample(settings, name, prompts, num_images, steps=steps, guidance=guidance, seed=seed,
                    batch_size=batch_size, negative_prompt=negative_prompt, size=size, base=base, lora=lora,
                    lora_scale=lora_scale, model_given=model is not None, allow_pickle=allow_pickle)
    report(result, as_json)
    if result.get("state") == "complete" and not as_json:
        emit(result, False, f"grid: {result['grid']}")


@command(app, "tokens")
def tokens_cmd(
    root: ProjectDir,
    count: Annotated[int, typer.Option("--count", help="How many tokens to propose.")] = 10,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    allow_pickle: AllowPickleOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Propose rare single-token identifiers from the model's tokenizer (rule: docs/dreambooth.md)."""
    from vfx.dreambooth.tokens import load_tokenizer, suggest_tokens

    settings = settings_for(root, model, "cpu", None, None, False, allow_pickle, model_config, shardable=False)
    found = suggest_tokens(load_tokenizer(settings), count)
    result = {"model": settings.model.spec, "tokens": [c.as_dict() for c in found]}
    if found:
        text = "\n".join(f"{c.token}\t(id {c.token_id})" for c in found)
    else:
        text = ("no token of this tokenizer passes the rule (3-4 letters, one token, no vowel, not a known "
                "abbreviation); pick a short made-up word and check how it tokenizes")
    emit(result, as_json, text)


@command(app, "export")
def export_cmd(
    root: ProjectDir,
    name: RunOpt,
    fmt: Annotated[str, typer.Option("--format", help="kohya: a LoRA for A1111/ComfyUI/kohya; checkpoint: a full "
                                     "fine-tune as one original-layout .safetensors; diffusers: the LoRA file or "
                                     "pipeline folder.")] = "kohya",
    out: Annotated[Path, typer.Option("--out", help="Where to write: a .safetensors file (a folder for a full "
                                      "fine-tune in diffusers format).", show_default=False)] = ...,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export a run's trained weights for other tools (A1111, ComfyUI, kohya, diffusers)."""
    from vfx.dreambooth.export import export
    from vfx.project import Project

    result = export(Project.open(root), name, fmt, out, force)
    emit(result, as_json, f"{result['format']} export: {result['out']}")
