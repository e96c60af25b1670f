"""The options of `vfx train`: defaults per mode and model, checks, and which of them change the weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from vfx.errors import BadInput

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPTIMIZERS = ("adamw", "adamw8bit")
# Reference defaults (diffusers' DreamBooth scripts): full fine-tuning is gentle, LoRA is not.
DEFAULT_LR = {"full": 5e-6, "lora": 1e-4}
DEFAULT_STEPS = {"full": 400, "lora": 500}


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
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    train_text_encoder: bool = False
    learning_rate: float | None = None
    text_encoder_lr: float | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_steps: int | None = None
    batch_size: int = 1
    gradient_accumulation: int = 1
    optimizer: str = "adamw"
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
            lora_alpha=float(self.lora_alpha if self.lora_alpha is not None else self.rank),
            text_encoder_lr=self.text_encoder_lr if self.text_encoder_lr is not None else lr,
            max_steps=self.max_steps if self.max_steps is not None else DEFAULT_STEPS[self.mode],
            resolution=self.resolution or native,
            seed=int(project_seed if self.seed is None else self.seed),
            validation_every=self.checkpoint_every if self.validation_every is None else self.validation_every,
        )
        checks = [
            (cfg.rank >= 1, f"--rank {cfg.rank}: must be at least 1"),
            (cfg.lora_alpha > 0, f"--lora-alpha {cfg.lora_alpha}: must be positive"),
            (0 <= cfg.lora_dropout < 1, f"--lora-dropout {cfg.lora_dropout}: must be in [0, 1)"),
            (cfg.learning_rate > 0, f"--learning-rate {cfg.learning_rate}: must be positive"),
            (cfg.text_encoder_lr > 0, f"--text-encoder-lr {cfg.text_encoder_lr}: must be positive"),
            (cfg.weight_decay >= 0, f"--weight-decay {cfg.weight_decay}: must be 0 or more"),
            (cfg.validation_every >= 1, f"--validation-every {cfg.validation_every}: must be at least 1"),
            (cfg.lr_scheduler in LR_SCHEDULERS, f"--lr-scheduler {cfg.lr_scheduler!r}: use one of {', '.join(LR_SCHEDULERS)}"),
            (cfg.lr_warmup_steps >= 0, f"--lr-warmup-steps {cfg.lr_warmup_steps}: must be 0 or more"),
            (cfg.max_steps >= 1, f"--max-steps {cfg.max_steps}: must be at least 1"),
            (cfg.batch_size >= 1, f"--batch-size {cfg.batch_size}: must be at least 1"),
            (cfg.gradient_accumulation >= 1, f"--gradient-accumulation {cfg.gradient_accumulation}: must be at least 1"),
            (cfg.optimizer in OPTIMIZERS, f"--optimizer {cfg.optimizer!r}: use {' or '.join(OPTIMIZERS)}"),
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
        if cfg.optimizer == "adamw8bit":
            require_bitsandbytes()
        return cfg

    def weight_params(self) -> dict:
        """The options that change the trained weights: the fingerprint (bookkeeping options excluded)."""
        skip = {"name", "instance_dir", "class_dir", "identifier", "checkpoint_every", "keep", "resume", "stop_after",
                "validation_prompt", "validation_every", "validation_images", "validation_steps", "eval_pairs"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def require_bitsandbytes() -> None:
    """8-bit AdamW comes from the optional bitsandbytes package; say how to get it before anything runs."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise BadInput("--optimizer adamw8bit needs bitsandbytes, which is not installed: "
                       "pip install 'vfx[bnb]' (or pip install bitsandbytes)") from None
