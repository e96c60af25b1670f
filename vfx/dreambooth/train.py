"""`vfx train`: DreamBooth fine-tuning with prior preservation, full or LoRA, with exact resume.

One explicit loop (`train`, nanoGPT style). Each step takes `batch_size` instance examples and, when the
prior loss is on, as many class examples, in one batch; noises their latents at random timesteps; and
takes one optimizer step on MSE(instance) + λ·MSE(class). Everything random comes from places a
checkpoint saves: a training generator (crops, flips, posterior samples, noise, timesteps), the global
RNGs (dropout), and an example order that is a function of (seed, epoch). A resumed run therefore
retraces an uninterrupted one exactly.
"""

from __future__ import annotations

import shlex
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from vfx import log
from vfx.errors import BadInput, MissingStage
from vfx.media import read_image
from vfx.models import load_pipeline
from vfx.stage import StageFolder, StageRun
from vfx.stages.common import Settings, up_to_date_result
from vfx.dreambooth import checkpoint
from vfx.dreambooth.config import PRECISIONS, TrainConfig
from vfx.dreambooth.data import (
    ExampleOrder, ImageSet, check_prompt, files_identity, identifier_problem, list_images, read_images, run_folder,
)
from vfx.dreambooth.encoding import Conditioning, Latents
from vfx.dreambooth.evaluate import METRICS, Metrics, eval_loss, eval_set, validate
from vfx.dreambooth.images import native_resolution
from vfx.dreambooth.objective import dreambooth_loss, draw_noise, draw_timesteps, prediction_target, snr_weights
from vfx.dreambooth.regularize import FOLDER as CLASS_FOLDER, class_images
from vfx.dreambooth.weights import save_full, save_lora, write_info

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class Prior:
    """Class images for the prior-preservation loss, and where they came from."""

    prompt: str
    files: list[Path]
    params: dict
    inputs: dict


# ---------------------------------------------------------------- inputs


def find_prior(settings: Settings, cfg: TrainConfig, run_dir: Path) -> Prior | None:
    """The class images to use, or None when the prior loss is off; errors name the command to run."""
    if cfg.prior_loss_weight == 0:
        if cfg.class_prompt or cfg.class_dir:
            log.note("--prior-loss-weight 0: training without class images")
        return None
    if cfg.class_dir:
        if not cfg.class_prompt:
            raise BadInput("--class-dir needs --class-prompt: the prompt its images show (e.g. 'a photo of a dog')")
        files = check_images(list_images(cfg.class_dir, "class"))
        return Prior(cfg.class_prompt, files, {"class_images": files_identity(files)}, {})
    folder = run_dir / CLASS_FOLDER
    manifest = class_images(folder)
    prompt = cfg.class_prompt or (manifest or {}).get("prompt") or "a photo of a CLASS"
    command = (f"vfx regularize {shlex.quote(str(settings.project.root))} --name {cfg.name} "
               f"--class-prompt {shlex.quote(prompt)} --model {shlex.quote(settings.model.spec)}")
    if manifest is None:
        if cfg.class_prompt:
            raise MissingStage("regularize", command)
        log.note("no class images and no --class-prompt: training without the prior-preservation loss")
        return None
    if cfg.class_prompt and cfg.class_prompt != manifest["prompt"]:
        raise BadInput(f"the class images in {folder} show {manifest['prompt']!r}, not {cfg.class_prompt!r}; "
                       f"run `{command}` first")
    if manifest["model"] != settings.model.identity:
        raise BadInput(f"the class images in {folder} were made by another model ({manifest.get('model_spec')}); "
                       f"run `{command}` first")
    files = check_images([folder / image["file"] for image in manifest["images"]])
    fingerprint = (StageFolder(folder).record() or {}).get("fingerprint")
    rel = str(folder.relative_to(settings.project.root))
    return Prior(manifest["prompt"], files, {}, {rel: fingerprint})


def check_images(files: list[Path]) -> list[Path]:
    """Decode every file once (and let it go), so a damaged one stops training before it starts."""
    for path in files:
        read_image(path)
    return files


def check_resumable(state: dict, settings: Settings, cfg: TrainConfig, fingerprint: str, world: int) -> None:
    """A checkpoint from another base model or another parameter layout cannot be resumed."""
    if state.get("base_model") != settings.model.identity:
        raise BadInput(
            f"the checkpoint was trained from another base model ({state.get('base_model_spec')}, "
            f"identity {state.get('base_model')}), not {settings.model.spec} ({settings.model.identity}); "
            "pass the same --model, or train without --resume"
        )
    saved = state.get("config", {})
    for key in ("mode", "rank", "train_text_encoder"):
        if saved.get(key) != getattr(cfg, key):
            raise BadInput(f"the checkpoint was trained with {key}={saved.get(key)!r}, not {getattr(cfg, key)!r}; "
                           "pass the same options to resume it")
    if state.get("fingerprint") != fingerprint or state.get("world_size") != world:
        changed = sorted(k for k, v in cfg.weight_params().items() if saved.get(k) != v)
        log.warn(f"resuming with changed options ({', '.join(changed) or 'number of processes'}): "
                 "the result will not equal an uninterrupted run")


# ---------------------------------------------------------------- model set-up


def make_accelerator(cfg: TrainConfig, device: torch.device):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Several trainings in one process (tests, notebooks) may differ in precision; the process group stays.
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=device.type == "cpu")


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_trainable(pipe, cfg: TrainConfig, weight_dtype: torch.dtype) -> dict[str, torch.nn.Parameter]:
    """Freeze what is not trained, add LoRA layers when asked; returns the trained parameters by name."""
    unet, text_encoder = pipe.unet, pipe.text_encoder
    pipe.vae.requires_grad_(False)
    unet.requires_grad_(cfg.mode == "full")
    text_encoder.requires_grad_(cfg.mode == "full" and cfg.train_text_encoder)
    if cfg.mode == "lora":
        from peft import LoraConfig

        unet.to(weight_dtype)  # the frozen base may be half precision; the LoRA layers stay fp32
        unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, lora_dropout=cfg.lora_dropout,
                                    init_lora_weights="gaussian", target_modules=UNET_LORA_TARGETS))
        if cfg.train_text_encoder:
            # peft directly: transformers' own `add_adapter` insists on a newer peft than diffusers needs.
            from peft import inject_adapter_in_model

            inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, lora_dropout=cfg.lora_dropout,
                                               init_lora_weights="gaussian", target_modules=TEXT_LORA_TARGETS),
                                    text_encoder)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            enable_text_checkpointing(text_encoder)
    trained = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    trained.update({f"text_encoder.{n}": p for n, p in text_encoder.named_parameters() if p.requires_grad})
    for param in trained.values():
        param.data = param.data.float()
    return trained


def enable_text_checkpointing(text_encoder) -> None:
    """Activation checkpointing in the text encoder, under either name transformers has used for it."""
    kwargs = {"use_reentrant": False}  # works when the encoder's inputs (token ids) need no gradient
    if hasattr(text_encoder, "activation_checkpointing_enable"):
        text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
# ---------------------------------------------------------------- the run


def train(settings: Settings, cfg: TrainConfig) -> dict:
    run_dir = run_folder(settings.project, cfg.name)
    cfg = cfg.resolved(native_resolution(settings), settings.project.get("seed"), settings.device)

    # Read and check every input before anything is written.
    instance_files = list_images(cfg.instance_dir, "instance")
    instance_arrays = read_images(instance_files)
    prior = find_prior(settings, cfg, run_dir)
    if prior is None:
        cfg = replace(cfg, class_prompt=None, prior_loss_weight=0.0)
    else:
        cfg = replace(cfg, class_prompt=prior.prompt)
    params = {**cfg.weight_params(), "model": settings.model.identity,
              "instance_images": files_identity(instance_files), **(prior.params if prior else {})}
    run = StageRun(run_dir / "weights", "train", params, prior.inputs if prior else {}, 1, force=settings.force)
    if run.up_to_date() and not settings.force:
        return up_to_date_result(run, {"weights": str(run.path)})

    ckpt_root = run_dir / "checkpoints"
    resume_from = None
    if cfg.resume and settings.force:
        raise BadInput("--force starts over and --resume continues a run; pass one of them")
    if cfg.resume:
        resume_from = checkpoint.find_checkpoint(ckpt_root, cfg.resume)
    elif checkpoint.list_checkpoints(ckpt_root) and not settings.force:
        step, latest = checkpoint.list_checkpoints(ckpt_root)[-1]
        if checkpoint.read_state(latest).get("fingerprint") != run.fingerprint:
            raise BadInput(f"{ckpt_root} holds checkpoints of a training with other options (latest: step {step}); "
                           "pass --resume latest to continue it with these options, or --force to start over")
        resume_from = latest
        log.note(f"resuming from {latest.name} (same options); pass --force to start over")
    resume_state = checkpoint.read_state(resume_from) if resume_from else None

    accelerator = make_accelerator(cfg, settings.device)
    world, rank = accelerator.num_processes, accelerator.process_index
    if not accelerator.is_main_process:
        log.set_quiet(True)  # one progress bar and one set of notes, from the main process
    if resume_state:
        check_resumable(resume_state, settings, cfg, run.fingerprint, world)
    weight_dtype = PRECISIONS[cfg.mixed_precision]
    seed_everything(cfg.seed)  # before LoRA layers are made: their initialisation is random
    pipe = load_pipeline(settings.model, accelerator.device, torch.float32)
    tokenizer = pipe.tokenizer
    check_prompt(tokenizer, cfg.instance_prompt, "the instance prompt")
    if prior:
        check_prompt(tokenizer, prior.prompt, "the class prompt")
    if cfg.validation_prompt:
        check_prompt(tokenizer, cfg.validation_prompt, "the validation prompt")
    problem = identifier_problem(tokenizer, cfg.instance_prompt, cfg.class_prompt, cfg.identifier)
    if problem and accelerator.is_main_process:
        log.warn(problem)

    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    num_timesteps = int(noise_scheduler.config.num_train_timesteps)
    trained = set_trainable(pipe, cfg, weight_dtype)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    unet_params = [p for n, p in trained.items() if n.startswith("unet.")]
    text_params = [p for n, p in trained.items() if n.startswith("text_encoder.")]
    groups = [{"params": unet_params, "lr": cfg.learning_rate}]
    if text_params:
        groups.append({"params": text_params, "lr": cfg.text_encoder_lr})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    # Stepped once per optimizer step, in every process alike (not through accelerate's wrapper,
    # which would step it once per process).
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_steps)
    if cfg.train_text_encoder:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
        text_encoder.eval()

    # Data: latents and text embeddings cached wherever they cannot change.
    instances = Latents(ImageSet.from_arrays(instance_arrays, cfg.resolution, cfg.random_crop, cfg.flip), pipe.vae)
    classes = Latents.from_files(prior.files, cfg.resolution, pipe.vae) if prior else None
    prompts = [cfg.instance_prompt] + ([prior.prompt] if prior else [])
    conditioning = Conditioning(text_encoder, tokenizer, prompts, cfg.train_text_encoder)
    instance_order = ExampleOrder(len(instance_arrays), cfg.seed, 0)
    class_order = ExampleOrder(len(prior.files), cfg.seed, 1) if prior else None
    generator = torch.Generator().manual_seed(cfg.seed + rank)
    fixed_eval = eval_set(instances, cfg.eval_pairs, cfg.seed, num_timesteps) if cfg.eval_pairs else None

    step = 0
    if resume_from:
        state = checkpoint.load(resume_from, rank=rank, parameters=trained, optimizer=optimizer,
                                lr_scheduler=lr_scheduler, scaler=accelerator.scaler, generator=generator)
        step = int(state["step"])
        instance_order.load_state_dict(state["data_order"]["instance"])
        if class_order and state["data_order"].get("class"):
            class_order.load_state_dict(state["data_order"]["class"])
        log.info(f"train: resumed from {resume_from} at step {step}")
    elif accelerator.is_main_process:
        # A fresh start (--force, or nothing there): earlier checkpoints and validation images are void.
        shutil.rmtree(ckpt_root, ignore_errors=True)
        shutil.rmtree(run_dir / "validation", ignore_errors=True)
    accelerator.wait_for_everyone()

    main = accelerator.is_main_process
    metrics = Metrics(run_dir / METRICS, main, step if resume_from else None)
    raw_unet = accelerator.unwrap_model(unet)
    raw_text = accelerator.unwrap_model(text_encoder)

    def evaluate() -> None:
        if fixed_eval is not None and main:
            value = eval_loss(raw_unet, conditioning, raw_text, noise_scheduler, fixed_eval, accelerator.autocast)
            metrics.write({"step": step, "eval_instance_loss": value})

    def save_checkpoint() -> Path:
        meta = {
            "fingerprint": run.fingerprint, "base_model": settings.model.identity,
            "base_model_spec": settings.model.spec, "config": cfg.weight_params(), "world_size": world,
            "data_order": {"instance": instance_order.state_dict(),
                           "class": class_order.state_dict() if class_order else None},
        }
        checkpoint.save(ckpt_root, step, rank=rank, is_main=main,
                        trainable={n: p for n, p in trained.items()}, optimizer=optimizer,
                        lr_scheduler=lr_scheduler, scaler=accelerator.scaler, generator=generator, meta=meta)
        accelerator.wait_for_everyone()
        if main:
            checkpoint.publish(ckpt_root, step)
            checkpoint.prune(ckpt_root, cfg.keep)
        accelerator.wait_for_everyone()
        return checkpoint.step_dir(ckpt_root, step)

    if not resume_from:
        evaluate()
    unet.train()
    if cfg.train_text_encoder:
        text_encoder.train()
    started, steps_here, last = time.time(), 0, {}
    budget = cfg.max_steps - step if cfg.stop_after is None else min(cfg.max_steps - step, cfg.stop_after)
    with log.progress("train", budget, "steps") as bar:
        while step < cfg.max_steps and steps_here < budget:
            began = time.perf_counter()
            # The global batch is drawn in every process alike; each process takes its own slice.
            n_inst = cfg.batch_size
            mine = slice(rank * n_inst, (rank + 1) * n_inst)
            inst_idx = instance_order.take(n_inst * world)[mine]
            cls_idx = class_order.take(n_inst * world)[mine] if class_order else []
            latents = instances.sample(inst_idx, generator)
            if classes is not None:
                latents = torch.cat([latents, classes.sample(cls_idx, generator)])
            noise = draw_noise(tuple(latents.shape), generator, cfg.offset_noise).to(latents.device)
            timesteps = draw_timesteps(len(latents), num_timesteps, generator).to(latents.device)

            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            cond = conditioning.batch([len(inst_idx), len(cls_idx)], text_encoder)
            pred = unet(noisy, timesteps, cond).sample
            target = prediction_target(noise_scheduler, latents, noise, timesteps)
            weights = snr_weights(noise_scheduler, timesteps, cfg.snr_gamma) if cfg.snr_gamma else None
            loss, inst_loss, prior_loss = dreambooth_loss(pred, target, len(inst_idx), cfg.prior_loss_weight, weights)

            accelerator.backward(loss)
            if cfg.max_grad_norm > 0 and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(list(trained.values()), cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_here += 1

            lrs = lr_scheduler.get_last_lr()
            last = {
                "step": step,
                "epoch": instance_order.epoch,
                "loss": float(accelerator.reduce(loss.detach(), "mean")),
                "instance_loss": float(accelerator.reduce(inst_loss.detach(), "mean")),
                "prior_loss": float(accelerator.reduce(prior_loss.detach(), "mean")) if prior_loss is not None else None,
                "prior_loss_weight": cfg.prior_loss_weight,
                "lr": lrs[0],
                "lr_text_encoder": lrs[1] if len(lrs) > 1 else None,
                "step_seconds": round(time.perf_counter() - began, 4),
            }
            metrics.write(last)
            bar.advance()
            bar.phase(f"loss {last['loss']:.4f}")

            stopping = steps_here == budget
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stopping:
                save_checkpoint()
                evaluate()
            if cfg.validation_prompt and main and (step % cfg.validation_every == 0 or step == cfg.max_steps):
                validate(pipe, raw_unet, raw_text, cfg, step, run_dir / "validation", accelerator)
    metrics.close()

    latest = checkpoint.list_checkpoints(ckpt_root)
    result = {
        "stage": "train", "folder": str(run.path), "step": step, "max_steps": cfg.max_steps, "mode": cfg.mode,
        "steps_run": steps_here, "checkpoint": str(latest[-1][1]) if latest else None,
        "metrics": str(run_dir / METRICS), "last": last, "fingerprint": run.fingerprint,
        "prior": bool(prior), "seconds": round(time.time() - started, 3), "main_process": accelerator.is_main_process,
    }
    if step < cfg.max_steps:
        return {**result, "state": "partial"}

    if main:
        write_weights(run_dir, pipe, raw_unet, raw_text, cfg, settings, started)
        run.complete_single({"steps": step, "mode": cfg.mode, "last": last}, started)
    accelerator.wait_for_everyone()
    return {**result, "state": "complete", "weights": str(run.path)}


def write_weights(run_dir: Path, pipe, unet, text_encoder, cfg: TrainConfig, settings: Settings, started: float) -> None:
    """Inference weights built beside the old ones, then swapped in (old weights survive a failure)."""
    partial, final, old = run_dir / ".weights.partial", run_dir / "weights", run_dir / ".weights.old"
    if old.exists() and not final.exists():
        old.rename(final)  # an earlier run died mid-swap: its previous weights come back first
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if cfg.mode == "full":
        save_full(partial, pipe, unet, text_encoder)
    else:
        save_lora(partial, unet, text_encoder if cfg.train_text_encoder else None)
    write_info(partial, {
        "mode": cfg.mode, "base_model": settings.model.identity, "base_model_spec": settings.model.spec,
        "instance_prompt": cfg.instance_prompt, "class_prompt": cfg.class_prompt, "identifier": cfg.identifier,
        "rank": cfg.rank if cfg.mode == "lora" else None, "train_text_encoder": cfg.train_text_encoder,
        "steps": cfg.max_steps, "resolution": cfg.resolution,
    })
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)
