"""The options of `vfx edit`, validated once: defaults per method filled in, contradictions refused.

Imports nothing heavy, so the command line can read its defaults without loading torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from vfx.errors import BadInput
from vfx.project import slugify, validate_name

NEGATIVE_PROMPT = "ugly, blurry, low res, unrealistic, unaesthetic"
METHODS = ("pnp", "sdedit")
PROPAGATION_MODES = ("distance", "reference")
CORRESPONDENCES = ("features", "flow")
CONTROLS = ("canny",)
RESERVED_NAMES = {"source", "inversion"}  # used by decode/ and eval/ for the source and the reconstruction
# The reference's defaults: PnP injects q/k for the first half of the steps, features for the first 80%;
# SDEdit starts at 0.9 of the noise; Canny thresholds 100/200.
DEFAULTS = {"pnp_attn_t": 0.5, "pnp_f_t": 0.8, "start": 0.9, "control_scale": 1.0, "canny_low": 100,
            "canny_high": 200, "lora_scale": 1.0}


@dataclass(frozen=True)
class EditConfig:
    """Every option of `vfx edit`; None means 'the default for this method' (see DEFAULTS)."""

    prompt: str
    name: str | None = None
    negative_prompt: str = NEGATIVE_PROMPT
    guidance: float = 7.5
    steps: int = 50
    batch_size: int = 8  # window length: one keyframe per window, every step
    method: str = "pnp"
    pnp_attn_t: float | None = None
    pnp_f_t: float | None = None
    start: float | None = None
    fresh_noise: bool = False
    control: str | None = None
    control_model: str | None = None
    control_scale: float | None = None
    canny_low: int | None = None
    canny_high: int | None = None
    correspondence: str = "features"
    lora: Path | None = None
    lora_scale: float | None = None
    seed: int | None = None
    propagation: str = "distance"
    keyframes: Path | None = None
    keyframe_batch: int = 0
    frame_batch: int = 16

    def resolved(self, project_seed: int) -> "EditConfig":
        """Defaults filled in and every value checked (BadInput on the first bad one)."""
        if not self.prompt or not self.prompt.strip():
            raise BadInput("the edit prompt is empty; describe the edited video with --prompt")
        name = validate_name(self.name or slugify(self.prompt), "edit name")
        if name in RESERVED_NAMES:
            raise BadInput(f"the edit name {name!r} is reserved; choose another with --name")
        choose("--method", self.method, METHODS)
        choose("--propagation", self.propagation, PROPAGATION_MODES)
        choose("--correspondence", self.correspondence, CORRESPONDENCES)
        if self.batch_size < 1 or self.frame_batch < 1 or self.keyframe_batch < 0:
            raise BadInput("--batch-size and --frame-batch must be at least 1, --keyframe-batch at least 0")
        if not math.isfinite(self.guidance):
            raise BadInput(f"invalid --guidance {self.guidance}: must be a finite number")
        cfg = replace(self, name=name, seed=int(project_seed if self.seed is None else self.seed))
        cfg = cfg._method_resolved()._control_resolved()
        if cfg.lora is None:
            only_with(cfg.lora_scale is not None, "--lora-scale", "--lora PATH")
        else:
            cfg = replace(cfg, lora_scale=default(cfg.lora_scale, "lora_scale"))
            finite("--lora-scale", cfg.lora_scale)
        return cfg

    def _method_resolved(self) -> "EditConfig":
        """The method's own parameters, defaults filled in; options of the other method are refused."""
        if self.method == "pnp":
            only_with(self.start is not None, "--start", "--method sdedit")
            only_with(self.fresh_noise, "--fresh-noise", "--method sdedit")
            cfg = replace(self, pnp_attn_t=default(self.pnp_attn_t, "pnp_attn_t"),
                          pnp_f_t=default(self.pnp_f_t, "pnp_f_t"))
            for label, value in (("--pnp-attn-t", cfg.pnp_attn_t), ("--pnp-f-t", cfg.pnp_f_t)):
                if not 0 <= value <= 1:
                    raise BadInput(f"{label} {value} must lie in [0, 1] (a fraction of the steps)")
            return cfg
        only_with(self.pnp_attn_t is not None, "--pnp-attn-t", "--method pnp (SDEdit injects nothing)")
        only_with(self.pnp_f_t is not None, "--pnp-f-t", "--method pnp (SDEdit injects nothing)")
        return replace(self, pnp_attn_t=0.0, pnp_f_t=0.0, start=default(self.start, "start"))

    def _control_resolved(self) -> "EditConfig":
        if self.control is None:
            for flag, value in (("--control-model", self.control_model), ("--control-scale", self.control_scale),
                                ("--canny-low", self.canny_low), ("--canny-high", self.canny_high)):
                only_with(value is not None, flag, "--control canny")
            return self
        choose("--control", self.control, CONTROLS)
        cfg = replace(self, control_scale=default(self.control_scale, "control_scale"),
                      canny_low=default(self.canny_low, "canny_low"), canny_high=default(self.canny_high, "canny_high"))
        finite("--control-scale", cfg.control_scale)
        if not 0 <= cfg.canny_low <= cfg.canny_high:
            raise BadInput(f"--canny-low {cfg.canny_low} and --canny-high {cfg.canny_high}: need 0 <= low <= high")
        return cfg

def default(value, key: str):
    return DEFAULTS[key] if value is None else value


def choose(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise BadInput(f"unknown {flag} {value!r}: use {' or '.join(allowed)}")


def finite(flag: str, value: float) -> None:
    if not math.isfinite(value):
        raise BadInput(f"invalid {flag} {value}: must be a finite number")


def only_with(given: bool, flag: str, needs: str) -> None:
    """Refuse an option that would be silently ignored."""
    if given:
        raise BadInput(f"{flag} applies only with {needs}")
