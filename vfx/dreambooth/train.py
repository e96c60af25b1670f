"""`vfx train`: DreamBooth fine-tuning with prior preservation, full or LoRA, with exact resume.

One explicit loop (`train`, nanoGPT style). Each step takes `batch_size` instance examples and, when the
prior loss is on, as many class examples, in one batch; noises their latents at random timesteps; and
takes one optimizer step on MSE(instance) + λ·MSE(class). Everything random comes from places a
checkpoint saves: a training generator (crops, flips, posterior samples, noise, timesteps), the global
RNGs (dropout), and an example order that is a function of (seed, epoch). A resumed run therefore
retraces an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from vfx import log
from vfx.errors import BadInput, MissingStage
from vfx.fsutil import atomic_write_text
from vfx.models import load_pipeline
from vfx.media import read_image
from vfx.stage import StageFolder, StageRun
from vfx.stages.common import Settings, up_to_date_result
from vfx.dreambooth import checkpoint
from vfx.dreambooth.data import (
    ExampleOrder, ImageSet, check_prompt, files_identity, identifier_problem, list_images, read_images, run_folder,
)
from vfx.dreambooth.images import generate, native_resolution, write_png
from vfx.dreambooth.objective import dreambooth_loss, draw_noise, draw_timesteps, prediction_target, snr_weights
from vfx.dreambooth.regularize import FOLDER as CLASS_FOLDER, class_images
from vfx.dreambooth.weights import save_full, save_lora, write_info

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Reference defaults (diffusers' DreamBooth scripts): full fine-tuning is gentle, LoRA is not.
DEFAULT_LR = {"full": 5e-6, "lora": 1e-4}
DEFAULT_STEPS = {"full": 400, "lora": 500}
METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Every option of `vfx train`; None means 'the default for this mode or model'."""

    name: str
    instance_dir: Path
    instance_prompt: str
    class_prompt: str | None = None
    class_dir: Path | None = None
    prior_loss_weight: float = 1.0
    identifier: str | None = None
    mode: str = "full"
    rank: int = 4
    lora_dropout: float = 0.0
    train_text_encoder: bool = False
    learning_rate: float | None = None
    text_encoder_lr: float | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_steps: int | None = None
    batch_size: int = 1
    resolution: int | None = None
    random_crop: bool = False
    flip: bool = False
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    snr_gamma: float | None = None
    offset_noise: float = 0.0
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    seed: int | None = None
    checkpoint_every: int = 100
    keep: int = 2
    resume: str | None = None
    stop_after: int | None = None
    validation_prompt: str | None = None
    validation_every: int | None = None
    validation_images: int = 2
    validation_steps: int = 25
    eval_pairs: int = 4

    def resolved(self, native: int, project_seed: int, device: torch.device) -> "TrainConfig":
        """Defaults filled in and every value checked (BadInput on the first bad one)."""
        if self.mode not in DEFAULT_LR:
            raise BadInput(f"invalid --mode {self.mode!r}: use full or lora")
        lr = self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.mode]
        cfg = replace(
            self,
            learning_rate=lr,
            text_encoder_lr=self.text_encoder_lr if self.text_encoder_lr is not None else lr,
            max_steps=self.max_steps if self.max_steps is not None else DEFAULT_STEPS[self.mode],
            resolution=self.resolution or native,
            seed=int(project_seed if self.seed is None else self.seed),
            validation_every=self.validation_every or self.checkpoint_every,
        )
        checks = [
            (cfg.rank >= 1, f"--rank {cfg.rank}: must be at least 1"),
            (0 <= cfg.lora_dropout < 1, f"--lora-dropout {cfg.lora_dropout}: must be in [0, 1)"),
            (cfg.learning_rate > 0 and cfg.text_encoder_lr > 0, "learning rates must be positive"),
            (cfg.lr_scheduler in LR_SCHEDULERS, f"--lr-scheduler {cfg.lr_scheduler!r}: use one of {', '.join(LR_SCHEDULERS)}"),
            (cfg.lr_warmup_steps >= 0, f"--lr-warmup-steps {cfg.lr_warmup_steps}: must be 0 or more"),
            (cfg.max_steps >= 1, f"--max-steps {cfg.max_steps}: must be at least 1"),
            (cfg.batch_size >= 1, f"--batch-size {cfg.batch_size}: must be at least 1"),
            (cfg.resolution >= 8 and cfg.resolution % 8 == 0, f"--resolution {cfg.resolution}: must be a positive multiple of 8"),
            (cfg.mixed_precision in PRECISIONS, f"--mixed-precision {cfg.mixed_precision!r}: use no, fp16 or bf16"),
            (not (cfg.mixed_precision == "fp16" and device.type == "cpu"), "--mixed-precision fp16 needs a GPU; use bf16 or no on CPU"),
            (cfg.snr_gamma is None or cfg.snr_gamma > 0, f"--snr-gamma {cfg.snr_gamma}: must be positive"),
            (cfg.offset_noise >= 0, f"--offset-noise {cfg.offset_noise}: must be 0 or more"),
            (cfg.prior_loss_weight >= 0, f"--prior-loss-weight {cfg.prior_loss_weight}: must be 0 or more"),
            (cfg.max_grad_norm >= 0, f"--max-grad-norm {cfg.max_grad_norm}: must be 0 (off) or more"),
            (cfg.checkpoint_every >= 1, f"--checkpoint-every {cfg.checkpoint_every}: must be at least 1"),
            (cfg.keep >= 1, f"--keep {cfg.keep}: must be at least 1"),
            (cfg.stop_after is None or cfg.stop_after >= 1, f"--stop-after {cfg.stop_after}: must be at least 1"),
            (cfg.validation_images >= 1 and cfg.validation_steps >= 1, "validation needs at least 1 image and 1 step"),
            (cfg.eval_pairs >= 0, f"--eval-pairs {cfg.eval_pairs}: must be 0 (off) or more"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInput(f"invalid {message}")
        return cfg

    def weight_params(self) -> dict:
        """The options that change the trained weights: the fingerprint (bookkeeping options excluded)."""
        skip = {"name", "instance_dir", "class_dir", "identifier", "checkpoint_every", "keep", "resume", "stop_after",
                "validation_prompt", "validation_every", "validation_images", "validation_steps", "eval_pairs"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


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


@torch.no_grad()
def posterior(vae, pixels: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of [n, 3, r, r] pixels, in batches."""
    means, stds = [], []
    for start in range(0, len(pixels), batch):
        dist = vae.encode(pixels[start : start + batch].to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


class Latents:
    """Training latents of one image set: posterior samples, from cached posteriors when pixels are fixed."""

    def __init__(self, images: ImageSet | None, vae, cache: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.images, self.vae = images, vae
        self.scale = float(vae.config.scaling_factor)
        if cache is None and images.fixed:
            cache = posterior(vae, images.fixed_pixels())
        self.cache = cache

    @classmethod
    def from_files(cls, files: list[Path], resolution: int, vae, batch: int = 8) -> "Latents":
        """Cached posteriors of centre-cropped images, decoded a few at a time (hundreds of class
        images would not fit in memory as pixels)."""
        means, stds = [], []
        for start in range(0, len(files), batch):
            chunk = ImageSet.from_arrays(read_images(files[start : start + batch]), resolution)
            mean, std = posterior(vae, chunk.fixed_pixels())
            means.append(mean)
            stds.append(std)
        return cls(None, vae, (torch.cat(means), torch.cat(stds)))

    def sample(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        if self.cache is not None:
            mean, std = self.cache[0][indices], self.cache[1][indices]
        else:
            mean, std = posterior(self.vae, torch.stack([self.images.pixels(i, generator) for i in indices]))
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        return (mean + std * eps) * self.scale


def tokenize(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


class Conditioning:
    """Text embeddings for a batch of instance then class examples; computed once when the encoder is frozen."""

    def __init__(self, text_encoder, tokenizer, prompts: list[str], trained: bool):
        self.text_encoder, self.trained = text_encoder, trained
        device = next(text_encoder.parameters()).device
        self.ids = [tokenize(tokenizer, p).to(device) for p in prompts]
        self.cached = None if trained else [self.encode(ids) for ids in self.ids]

    def encode(self, ids: torch.Tensor, encoder=None) -> torch.Tensor:
        with torch.set_grad_enabled(self.trained and torch.is_grad_enabled()):
            return (encoder or self.text_encoder)(ids)[0]

    def batch(self, counts: list[int], encoder=None) -> torch.Tensor:
        if self.cached is not None:
            return torch.cat([e.expand(n, -1, -1) for e, n in zip(self.cached, counts) if n])
        ids = torch.cat([i.expand(n, -1) for i, n in zip(self.ids, counts) if n])
        return self.encode(ids, encoder)


# ---------------------------------------------------------------- evaluation and validation


def eval_set(latents: Latents, pairs: int, seed: int, num_timesteps: int):
    """A fixed set of (clean latent, noise, timestep) triples: each instance image at `pairs` spread timesteps."""
    mean = latents.cache[0] if latents.cache is not None else posterior(latents.vae, latents.images.fixed_pixels())[0]
    clean = (mean * latents.scale).repeat_interleave(pairs, dim=0)
    generator = torch.Generator().manual_seed(seed + 7919)  # its own stream: training randomness is untouched
    noise = torch.randn(clean.shape, generator=generator).to(clean.device)
    steps = torch.tensor([int((k + 0.5) * num_timesteps / pairs) for k in range(pairs)]).repeat(len(mean))
    return clean, noise, steps.to(clean.device)


@torch.no_grad()
def eval_loss(unet, conditioning: Conditioning, text_encoder, noise_scheduler, fixed, autocast=contextlib.nullcontext) -> float:
    """Mean instance MSE over the fixed evaluation set (eval mode, no dropout)."""
    clean, noise, steps = fixed
    was_training = text_encoder.training
    unet.eval()
    text_encoder.eval()
    total = 0.0
    with autocast():
        for start in range(0, len(clean), 8):
            x0, eps, t = clean[start : start + 8], noise[start : start + 8], steps[start : start + 8]
            cond = conditioning.batch([len(x0), 0], text_encoder)
            pred = unet(noise_scheduler.add_noise(x0, eps, t), t, cond).sample
            target = prediction_target(noise_scheduler, x0, eps, t)
            total += float(((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3)).sum())
    unet.train()
    text_encoder.train(was_training)
    return total / len(clean)


def validate(pipe, unet, text_encoder, cfg: TrainConfig, step: int, folder: Path, accelerator) -> list[str]:
    """Sample the validation prompt with the current weights; the training RNGs are left as they were."""
    from diffusers import StableDiffusionPipeline

    saved = checkpoint.rng_state()
    sampler = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=text_encoder, tokenizer=pipe.tokenizer, unet=unet, scheduler=pipe.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    sampler.set_progress_bar_config(disable=True)
    was_training = text_encoder.training
    unet.eval()
    text_encoder.eval()
    with accelerator.autocast():
        images = generate(sampler, [cfg.validation_prompt] * cfg.validation_images,
                          [cfg.seed + i for i in range(cfg.validation_images)], steps=cfg.validation_steps,
                          guidance=7.5, width=cfg.resolution, height=cfg.resolution)
    unet.train()
    text_encoder.train(was_training)
    checkpoint.set_rng_state(*saved)
    out = folder / f"step-{step:06d}"
    paths = []
    for index, image in enumerate(images):
        path = out / f"{index:02d}.png"
        write_png(path, image, {"prompt": cfg.validation_prompt, "seed": cfg.seed + index, "step": step})
        paths.append(str(path))
    return paths


# ---------------------------------------------------------------- metrics


class Metrics:
    """metrics.jsonl (and TensorBoard when it is installed), written by the main process only."""

    def __init__(self, path: Path, active: bool, resume_step: int | None):
        self.path, self.active, self.board = path, active, None
        if not active:
            return
        kept = []
        if resume_step is not None and path.is_file():
            # Lines after the checkpoint belong to steps the resumed run will redo.
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= resume_step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            pass

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


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
