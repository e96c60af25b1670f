"""`vfx train`: DreamBooth fine-tuning with prior preservation, full or LoRA, with exact resume.

One explicit loop (`train`, nanoGPT style). Each step takes `batch_size × gradient_accumulation` instance
examples and, when the prior loss is on, as many class examples; noises their latents at random timesteps;
runs them through the model in `gradient_accumulation` micro-batches, adding up the gradients; and takes
one optimizer step on MSE(instance) + λ·MSE(class). Everything random comes from places a
checkpoint saves: a training generator (crops, flips, posterior samples, noise, timesteps), the global
RNGs (dropout), and an example order that is a function of (seed, epoch). A resumed run therefore
retraces an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
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
from vfx.models import is_open_clip, load_pipeline
from vfx.driver import SingleUnitStage, drive
from vfx.settings import Settings
from vfx.stage import StageRun, refuse_links, upstream
from vfx.dreambooth import checkpoint
from vfx.dreambooth.config import PRECISIONS, TrainConfig
from vfx.dreambooth.data import (
    ExampleOrder, ImageSet, check_prompt, describe_photos, files_identity, identifier_problem, list_images,
    photo_warnings, read_images, run_folder,
)
from vfx.diffusion.text import is_sdxl, text_encoder_names, text_encoders, tokenizers
from vfx.dreambooth.encoding import Latents, PromptConditioning
from vfx.dreambooth.tracking import METRICS, Metrics, eval_loss, eval_set, validate
from vfx.dreambooth.images import native_resolution
from vfx.dreambooth.objective import dreambooth_loss, draw_noise, draw_timesteps, prediction_target, snr_weights
from vfx.dreambooth.regularize import FOLDER as CLASS_FOLDER, class_images
from vfx.dreambooth.weights import save_full, save_lora, write_info

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class Batch:
    """Examples of one step or micro-batch: instance rows first, then as many class rows."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    n_inst: int
    n_cls: int
    time_ids: torch.Tensor | None = None  # SDXL: each example's micro-conditioning [n, 6]

    def split(self, parts: int) -> list["Batch"]:
        """`parts` micro-batches, each with an equal share of the instance and of the class rows, in order."""
        if parts == 1:
            return [self]
        inst, cls = self.n_inst // parts, self.n_cls // parts
        micro = []
        for j in range(parts):
            rows = [*range(j * inst, (j + 1) * inst), *range(self.n_inst + j * cls, self.n_inst + (j + 1) * cls)]
            time_ids = self.time_ids[rows] if self.time_ids is not None else None
            micro.append(Batch(self.latents[rows], self.noise[rows], self.timesteps[rows], inst, cls, time_ids))
        return micro


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
        files = list_images(cfg.class_dir, "class")
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
    files = [folder / image["file"] for image in manifest["images"]]
    made = upstream(settings.project, "regularize", "manifest.json", cfg.name)
    return Prior(manifest["prompt"], files, {}, made.input())


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
    # Checkpoints from before --lora-alpha and --optimizer existed used alpha = rank and AdamW.
    older = {"lora_alpha": saved.get("rank"), "optimizer": "adamw"}
    for key in ("mode", "rank", "lora_alpha", "train_text_encoder", "optimizer"):
        was = saved.get(key, older.get(key))
        if was != getattr(cfg, key):
            raise BadInput(f"the checkpoint was trained with {key}={was!r}, not {getattr(cfg, key)!r}; "
                           "pass the same options to resume it")
    if state.get("fingerprint") != fingerprint or state.get("world_size") != world:
        changed = changed_options(saved, cfg.weight_params())
        log.warn(f"resuming with changed options ({', '.join(changed) or 'number of processes'}): "
                 "the result will not equal an uninterrupted run")


def changed_options(saved: dict, current: dict) -> list[str]:
    """`rank: 4 → 8` for every weight-changing option that differs from a checkpoint's."""
    return [f"{key}: {saved.get(key)!r} → {value!r}" for key, value in sorted(current.items()) if saved.get(key) != value]


# ---------------------------------------------------------------- model set-up


def make_accelerator(cfg: TrainConfig, device: torch.device, unused_parameters: bool = False):
    """`unused_parameters`: some trained parameters get no gradient (SDXL reads its first text encoder's
    penultimate layer, so that encoder's last layer is never used), which DDP must be told."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    # Several trainings in one process (tests, notebooks) may differ in precision; the process group stays.
    AcceleratorState._reset_state()
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if unused_parameters else []
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=device.type == "cpu", kwargs_handlers=handlers)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_trainable(pipe, cfg: TrainConfig, weight_dtype: torch.dtype) -> dict[str, torch.nn.Parameter]:
    """Freeze what is not trained, add LoRA layers when asked; returns the trained parameters by name
    ("unet.…", "text_encoder.…", SDXL's "text_encoder_2.…")."""
    unet, encoders = pipe.unet, {name: getattr(pipe, name) for name in text_encoder_names(pipe)}
    pipe.vae.requires_grad_(False)
    unet.requires_grad_(cfg.mode == "full")
    for text_encoder in encoders.values():
        text_encoder.requires_grad_(cfg.mode == "full" and cfg.train_text_encoder)
    if cfg.mode == "lora":
        from peft import LoraConfig

        unet.to(weight_dtype)  # the frozen base may be half precision; the LoRA layers stay fp32
        unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                    init_lora_weights="gaussian", target_modules=UNET_LORA_TARGETS))
        if cfg.train_text_encoder:
            # peft directly: transformers' own `add_adapter` insists on a newer peft than diffusers needs.
            from peft import inject_adapter_in_model

            for text_encoder in encoders.values():
                inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha,
                                                   lora_dropout=cfg.lora_dropout, init_lora_weights="gaussian",
                                                   target_modules=TEXT_LORA_TARGETS), text_encoder)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for text_encoder in encoders.values():
                enable_text_checkpointing(text_encoder)
    trained = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    for prefix, text_encoder in encoders.items():
        trained.update({f"{prefix}.{n}": p for n, p in text_encoder.named_parameters() if p.requires_grad})
    for param in trained.values():
        param.data = param.data.float()
    return trained


def make_optimizer(kind: str, groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' AdamW with 8-bit moments (block-wise quantised; small tensors keep fp32 ones)."""
    settings = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": weight_decay}
    if kind == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **settings)
    try:
        # One fused kernel for all tensors: on CPU, the per-tensor loop costs a third of a full-mode step.
        return torch.optim.AdamW(groups, fused=True, **settings)
    except RuntimeError:  # fused AdamW on CPU needs torch >= 2.4
        return torch.optim.AdamW(groups, foreach=True, **settings)


def enable_text_checkpointing(text_encoder) -> None:
    """Activation checkpointing in the text encoder, under either name transformers has used for it."""
    kwargs = {"use_reentrant": False}  # works when the encoder's inputs (token ids) need no gradient
    if hasattr(text_encoder, "activation_checkpointing_enable"):
        text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
# ---------------------------------------------------------------- the run


class Train(SingleUnitStage):
    """The training run as a stage: one unit, whose weights are built aside and swapped in when complete."""

    label = "train"

    def __init__(self, settings: Settings, cfg: TrainConfig):
        self.settings = settings
        self.run_dir = run_folder(settings.project, cfg.name)
        cfg = cfg.resolved(native_resolution(settings), settings.project.get("seed"), settings.device)
        if cfg.resume and settings.force:
            raise BadInput("--force starts over and --resume continues a run; pass one of them")
        if cfg.resume not in (None, "latest"):
            checkpoint.find_checkpoint(self.run_dir / "checkpoints", cfg.resume)  # a bad path fails before all else
        self.instance_files = list_images(cfg.instance_dir, "instance")
        self.prior = prior = find_prior(settings, cfg, self.run_dir)
        self.cfg = replace(cfg, class_prompt=None, prior_loss_weight=0.0) if prior is None else replace(
            cfg, class_prompt=prior.prompt)
        params = {**self.cfg.weight_params(), "model": settings.model.identity,
                  "instance_images": files_identity(self.instance_files), **(prior.params if prior else {})}
        self.run = StageRun(self.run_dir / "weights", "train", params, prior.inputs if prior else {}, 1,
                            force=settings.force)
        self.ckpt_root = self.run_dir / "checkpoints"

    def prepare(self) -> None:
        """Read and check every input, decide where to resume, and set the training up."""
        refuse_links(self.run_dir)  # checkpoints/, validation/ and weights/ are written below it
        instance_arrays = read_images(self.instance_files)
        self.photos = describe_photos(self.instance_files, instance_arrays)
        for warning in photo_warnings(self.photos, self.cfg.resolution):
            log.warn(warning)
        if self.prior:
            check_images(self.prior.files)
        resume_from = self.resume_point()
        self.trainer = Trainer(self.settings, self.cfg, self.run, self.prior, instance_arrays, resume_from)

    def resume_point(self) -> Path | None:
        """The checkpoint to continue from: the one asked for, or the latest one of the same options."""
        cfg, root = self.cfg, self.ckpt_root
        if cfg.resume:
            return checkpoint.find_checkpoint(root, cfg.resume)
        found = checkpoint.list_checkpoints(root)
        if not found or self.settings.force:
            return None
        step, latest = found[-1]
        state = checkpoint.read_state(latest)
        if state.get("fingerprint") != self.run.fingerprint:
            changes = changed_options(state.get("config", {}), self.cfg.weight_params())
            if state.get("base_model") != self.settings.model.identity:
                changes.insert(0, f"model: {state.get('base_model_spec')} → {self.settings.model.spec}")
            raise BadInput(f"{root} holds checkpoints of a training with other options (latest: step {step}; "
                           f"{', '.join(changes) or 'other photos or class images'}); pass --resume latest to "
                           "continue it with these options (where they are compatible), or --force to start over")
        log.note(f"resuming from {latest.name} (same options); pass --force to start over")
        return latest

    def build(self, scratch: Path) -> dict | None:
        trainer = self.trainer
        trainer.loop()
        if trainer.step < self.cfg.max_steps:
            return None
        if trainer.main:
            write_weights(scratch, trainer, self.cfg, self.settings)
        return {"steps": trainer.step, "mode": self.cfg.mode, "last": trainer.last, "photos": self.photos}

    def complete(self, summary: dict, started: float, swap_in) -> None:
        if self.trainer.main:
            super().complete(summary, self.trainer.started, swap_in)
        self.trainer.accelerator.wait_for_everyone()

    def partial_report(self) -> dict:
        return self.trainer.report()

    def report(self, summary: dict) -> dict:
        extra = self.trainer.report() if hasattr(self, "trainer") else {}
        return {**extra, "weights": str(self.run.path)}


class Trainer:
    """The training loop and everything it steps: model, optimizer, data, checkpoints, metrics."""

    def __init__(self, settings: Settings, cfg: TrainConfig, run: StageRun, prior: Prior | None,
                 instance_arrays: list[np.ndarray], resume_from: Path | None):
        self.settings, self.cfg, self.run, self.prior = settings, cfg, run, prior
        self.run_dir, self.resume_from = run.path.parent, resume_from
        self.ckpt_root = self.run_dir / "checkpoints"
        resume_state = checkpoint.read_state(resume_from) if resume_from else None
        self.accelerator = make_accelerator(cfg, settings.device,
                                            unused_parameters=cfg.train_text_encoder and settings.family == "sdxl")
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.main = self.accelerator.is_main_process
        if not self.main:
            log.set_quiet(True)  # one progress bar and one set of notes, from the main process
        if resume_state:
            check_resumable(resume_state, settings, cfg, run.fingerprint, self.world)
        self.set_up_model()
        self.set_up_optimizer()
        self.set_up_data(instance_arrays)
        self.step = self.restore() if resume_from else 0
        self.raw_unet = self.accelerator.unwrap_model(self.unet)
        self.raw_texts = [self.accelerator.unwrap_model(encoder) for encoder in self.text_encoders]
        self.last: dict = {}
        self.steps_here = 0
        self.started = time.time()

    def set_up_model(self) -> None:
        cfg, prior = self.cfg, self.prior
        seed_everything(cfg.seed)  # before LoRA layers are made: their initialisation is random
        self.pipe = pipe = load_pipeline(self.settings.model, self.accelerator.device, torch.float32,
                                         self.settings.model_config)
        self.sdxl = is_sdxl(pipe)
        check_prompt(pipe.tokenizer, cfg.instance_prompt, "the instance prompt")
        if prior:
            check_prompt(pipe.tokenizer, prior.prompt, "the class prompt")
        if cfg.validation_prompt:
            check_prompt(pipe.tokenizer, cfg.validation_prompt, "the validation prompt")
        problem = identifier_problem(pipe.tokenizer, cfg.instance_prompt, cfg.class_prompt, cfg.identifier)
        if problem and self.main:
            log.warn(problem)

        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.num_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        self.trained = set_trainable(pipe, cfg, PRECISIONS[cfg.mixed_precision])

    def set_up_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        cfg, pipe = self.cfg, self.pipe
        unet_params = [p for n, p in self.trained.items() if n.startswith("unet.")]
        text_params = [p for n, p in self.trained.items() if not n.startswith("unet.")]
        groups = [{"params": unet_params, "lr": cfg.learning_rate}]
        if text_params:
            groups.append({"params": text_params, "lr": cfg.text_encoder_lr})
        optimizer = make_optimizer(cfg.optimizer, groups, cfg.weight_decay)
        # Stepped once per optimizer step, in every process alike (not through accelerate's wrapper,
        # which would step it once per process).
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=cfg.max_steps)
        encoders = text_encoders(pipe)
        if cfg.train_text_encoder:
            self.unet, *self.text_encoders, self.optimizer = self.accelerator.prepare(pipe.unet, *encoders, optimizer)
        else:
            self.unet, self.optimizer = self.accelerator.prepare(pipe.unet, optimizer)
            self.text_encoders = encoders
            for encoder in encoders:
                encoder.eval()

    def set_up_data(self, instance_arrays: list[np.ndarray]) -> None:
        """Latents and text embeddings cached wherever they cannot change; the example orders."""
        cfg, prior, pipe = self.cfg, self.prior, self.pipe
        self.instances = Latents(ImageSet.from_arrays(instance_arrays, cfg.resolution, cfg.random_crop, cfg.flip),
                                 pipe.vae)
        self.classes = Latents.from_files(prior.files, cfg.resolution, pipe.vae) if prior else None
        prompts = [cfg.instance_prompt] + ([prior.prompt] if prior else [])
        self.conditioning = PromptConditioning(self.text_encoders, tokenizers(pipe), prompts, cfg.train_text_encoder)
        self.instance_order = ExampleOrder(len(instance_arrays), cfg.seed, 0)
        self.class_order = ExampleOrder(len(prior.files), cfg.seed, 1) if prior else None
        self.generator = torch.Generator().manual_seed(cfg.seed + self.rank)
        self.fixed_eval = eval_set(self.instances, cfg.eval_pairs, cfg.seed, self.num_timesteps) \
            if cfg.eval_pairs else None

    def restore(self) -> int:
        state = checkpoint.load(self.resume_from, rank=self.rank, parameters=self.trained, optimizer=self.optimizer,
                                lr_scheduler=self.lr_scheduler, scaler=self.accelerator.scaler,
                                generator=self.generator)
        self.instance_order.load_state_dict(state["data_order"]["instance"])
        if self.class_order and state["data_order"].get("class"):
            self.class_order.load_state_dict(state["data_order"]["class"])
        log.info(f"train: resumed from {self.resume_from} at step {int(state['step'])}")
        return int(state["step"])

    def start_fresh(self) -> None:
        """A fresh start (--force, or nothing there): earlier checkpoints and validation images are void."""
        if self.main:
            shutil.rmtree(self.ckpt_root, ignore_errors=True)
            shutil.rmtree(self.run_dir / "validation", ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def evaluate(self) -> None:
        if self.fixed_eval is not None and self.main:
            value = eval_loss(self.raw_unet, self.conditioning, self.raw_texts, self.noise_scheduler, self.fixed_eval,
                              self.accelerator.autocast)
            self.metrics.write({"step": self.step, "eval_instance_loss": value})

    def save_checkpoint(self) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        orders = {"instance": self.instance_order.state_dict(),
                  "class": self.class_order.state_dict() if self.class_order else None}
        meta = {"fingerprint": self.run.fingerprint, "base_model": self.settings.model.identity,
                "base_model_spec": self.settings.model.spec, "config": cfg.weight_params(),
                "world_size": self.world, "data_order": orders}
        checkpoint.save(self.ckpt_root, self.step, rank=self.rank, is_main=self.main, trainable=dict(self.trained),
                        optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, scaler=accelerator.scaler,
                        generator=self.generator, meta=meta)
        accelerator.wait_for_everyone()
        if self.main:
            checkpoint.publish(self.ckpt_root, self.step)
            checkpoint.prune(self.ckpt_root, cfg.keep)
        accelerator.wait_for_everyone()

    def loop(self) -> None:
        """Train to --max-steps (or --stop-after steps more), checkpointing and validating on schedule."""
        cfg = self.cfg
        # metrics.jsonl keeps the lines up to the checkpoint resumed from (the later steps are redone).
        self.metrics = Metrics(self.run_dir / METRICS, self.main, self.step if self.resume_from else None)
        if not self.resume_from:
            self.start_fresh()
            self.evaluate()
        self.unet.train()
        if cfg.train_text_encoder:
            for encoder in self.text_encoders:
                encoder.train()
        budget = cfg.max_steps - self.step if cfg.stop_after is None else min(cfg.max_steps - self.step,
                                                                              cfg.stop_after)
        # The bar counts the whole run: a resumed run starts at the checkpoint's step.
        with self.metrics, log.progress("train", cfg.max_steps, "steps", done=self.step) as bar:
            while self.step < cfg.max_steps and self.steps_here < budget:
                self.last = self.train_step()
                self.metrics.write(self.last)
                bar.values(loss=self.last["loss"], prior=self.last["prior_loss"], lr=self.last["lr"])
                bar.advance()
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps or self.steps_here == budget:
                    self.save_checkpoint()
                    self.evaluate()
                if cfg.validation_prompt and self.main and (self.step % cfg.validation_every == 0
                                                            or self.step == cfg.max_steps):
                    images = validate(self.pipe, self.raw_unet, self.raw_texts, cfg, self.step,
                                      self.run_dir / "validation", self.accelerator)
                    self.metrics.images(self.step, images)

    def train_step(self) -> dict:
        """One optimizer step on MSE(instance) + λ·MSE(class) over `gradient_accumulation` micro-batches;
        returns the step's metrics line."""
        cfg, accelerator = self.cfg, self.accelerator
        began = time.perf_counter()
        parts = cfg.gradient_accumulation
        # The whole step's batch is drawn at once, so N micro-batches of B see exactly the draws of one batch of N·B.
        micro = self.draw_batch(cfg.batch_size * parts).split(parts)
        terms = []
        for index, part in enumerate(micro):
            with self.no_sync(index < parts - 1):  # gradients are all-reduced once, after the last micro-batch
                terms.append(self.backward(part, parts))
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(list(self.trained.values()), cfg.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.steps_here += 1

        # Each micro-batch's terms are means over equal shares of the batch: their mean is the batch's.
        mean = lambda values: float(accelerator.reduce(torch.stack(values).mean(), "mean"))  # noqa: E731
        loss, inst_loss, prior_loss = (list(column) for column in zip(*terms))
        lrs = self.lr_scheduler.get_last_lr()
        return {
            "step": self.step, "epoch": self.instance_order.epoch, "loss": mean(loss),
            "instance_loss": mean(inst_loss), "prior_loss": mean(prior_loss) if self.classes is not None else None,
            "prior_loss_weight": cfg.prior_loss_weight, "lr": lrs[0], "lr_text_encoder": lrs[1] if len(lrs) > 1 else None,
            "step_seconds": round(time.perf_counter() - began, 4),
        }

    def draw_batch(self, n_inst: int) -> "Batch":
        """This process's `n_inst` instance examples (and as many class examples), noise and timesteps."""
        generator = self.generator
        # The global batch is drawn in every process alike; each process takes its own slice.
        mine = slice(self.rank * n_inst, (self.rank + 1) * n_inst)
        inst_idx = self.instance_order.take(n_inst * self.world)[mine]
        cls_idx = self.class_order.take(n_inst * self.world)[mine] if self.class_order else []
        latents, crops = self.instances.sample(inst_idx, generator)
        time_ids = [self.instances.time_ids(inst_idx, crops)] if self.sdxl else None
        if self.classes is not None:
            class_latents, class_crops = self.classes.sample(cls_idx, generator)
            latents = torch.cat([latents, class_latents])
            if self.sdxl:
                time_ids.append(self.classes.time_ids(cls_idx, class_crops))
        noise = draw_noise(tuple(latents.shape), generator, self.cfg.offset_noise).to(latents.device)
        timesteps = draw_timesteps(len(latents), self.num_timesteps, generator).to(latents.device)
        time_ids = torch.cat(time_ids).to(latents.device) if self.sdxl else None
        return Batch(latents, noise, timesteps, len(inst_idx), len(cls_idx), time_ids)

    def backward(self, part: "Batch", parts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Forward and backward of one micro-batch, its loss divided by `parts` so the gradients add up to
        the whole batch's; returns (loss, instance term, prior term) of the micro-batch."""
        cfg, scheduler = self.cfg, self.noise_scheduler
        noisy = scheduler.add_noise(part.latents, part.noise, part.timesteps)
        cond = self.conditioning.batch([part.n_inst, part.n_cls], self.text_encoders, part.time_ids)
        pred = self.unet(noisy, part.timesteps, **cond.unet_kwargs()).sample
        target = prediction_target(scheduler, part.latents, part.noise, part.timesteps)
        weights = snr_weights(scheduler, part.timesteps, cfg.snr_gamma) if cfg.snr_gamma else None
        terms = dreambooth_loss(pred, target, part.n_inst, cfg.prior_loss_weight, weights)
        self.accelerator.backward(terms[0] / parts)
        return tuple(t.detach() if t is not None else None for t in terms)

    def no_sync(self, skip: bool) -> contextlib.ExitStack:
        """Under several processes: no gradient all-reduce for this backward when `skip`."""
        stack = contextlib.ExitStack()
        if skip:
            for model in [self.unet] + (self.text_encoders if self.cfg.train_text_encoder else []):
                stack.enter_context(self.accelerator.no_sync(model))
        return stack

    def report(self) -> dict:
        latest = checkpoint.list_checkpoints(self.ckpt_root)
        return {
            "step": self.step, "max_steps": self.cfg.max_steps, "mode": self.cfg.mode, "steps_run": self.steps_here,
            "checkpoint": str(latest[-1][1]) if latest else None, "metrics": str(self.run_dir / METRICS),
            "last": self.last, "prior": bool(self.prior), "seconds": round(time.time() - self.started, 3),
            "main_process": self.main,
        }


def train(settings: Settings, cfg: TrainConfig) -> dict:
    return drive(Train(settings, cfg))


def write_weights(folder: Path, trainer: Trainer, cfg: TrainConfig, settings: Settings) -> None:
    """The inference weights (a pipeline folder, or the LoRA file) and dreambooth.json, into `folder`."""
    if cfg.mode == "full":
        save_full(folder, trainer.pipe, trainer.raw_unet, trainer.raw_texts)
    else:
        save_lora(folder, trainer.raw_unet, trainer.raw_texts if cfg.train_text_encoder else None)
    write_info(folder, {
        "mode": cfg.mode, "base_model": settings.model.identity, "base_model_spec": settings.model.spec,
        "base_model_config": settings.model_config,  # what a single-file base needs to load again
        "instance_prompt": cfg.instance_prompt, "class_prompt": cfg.class_prompt, "identifier": cfg.identifier,
        "rank": cfg.rank if cfg.mode == "lora" else None,
        "lora_alpha": cfg.lora_alpha if cfg.mode == "lora" else None, "train_text_encoder": cfg.train_text_encoder,
        "steps": cfg.max_steps, "resolution": cfg.resolution,
        # the base's architecture, so that an export needs no base model (a pickled one is never opened)
        "base_family": settings.family,
        "base_v2": settings.family == "sd" and is_open_clip(trainer.pipe.text_encoder.config.to_dict()),
    })
