"""The run settings of a model stage: flags resolved against vfx.toml, and the model loaded on demand."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from vfx import log
from vfx.distributed import local_device
from vfx.errors import BadInput
from vfx.models import ModelRef, load_pipeline, load_vae, resolve_model, scheduler_config
from vfx.project import Project
from vfx.runtime import dtype_name, resolve_device, resolve_dtype
from vfx.stage import Shard


def check_model_config(spec: str) -> None:
    """`--model-config` names a diffusers folder or a cached Hub id: checked before any model loads."""
    try:
        kind = resolve_model(spec).kind
    except BadInput as exc:
        raise BadInput(f"--model-config: {exc}") from None
    if kind not in {"folder", "hub"}:
        raise BadInput(f"--model-config {spec}: give a diffusers folder or a cached Hub id (its configs)")


@dataclass
class Settings:
    """Flags resolved against vfx.toml: what a stage runs with."""

    project: Project
    model: ModelRef
    device: torch.device
    dtype: torch.dtype
    shard: Shard
    force: bool = False
    model_config: str | None = None
    _pipe: Any = field(default=None, repr=False)

    @classmethod
    def resolve(
        cls,
        root: Path,
        model: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        shard: str | None = None,
        force: bool = False,
        allow_pickle: bool = False,
        model_config: str | None = None,
        shardable: bool = True,
    ) -> "Settings":
        project = Project.open(root)
        shard_spec = Shard.parse(shard) if shardable else Shard()
        resolved_device = local_device(resolve_device(project.get("device", device)))
        resolved_dtype = resolve_dtype(project.get("dtype", dtype), resolved_device)
        ref = resolve_model(project.get("model", model), allow_pickle=allow_pickle)
        if model_config is not None:
            check_model_config(model_config)
        return cls(project, ref, resolved_device, resolved_dtype, shard_spec, force, model_config)

    def with_model(self, model: ModelRef, model_config: str | None) -> "Settings":
        """The same flags for another model (nothing loaded)."""
        return Settings(self.project, model, self.device, self.dtype, self.shard, self.force, model_config)

    @cached_property
    def family(self) -> str:
        """sd | sdxl | depth, read from the model's configs (no weights loaded)."""
        from vfx.models import model_family

        return model_family(self.model, self.model_config)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def pipeline(self):
        if self._pipe is None:
            with log.err.status("loading model"):
                self._pipe = load_pipeline(self.model, self.device, self.dtype, self.model_config)
        return self._pipe

    def vae(self):
        """The model's VAE (fp32): the loaded pipeline's, or loaded alone when that is possible."""
        if self._pipe is None:
            with log.err.status("loading the VAE"):
                vae = load_vae(self.model, self.device)
            if vae is not None:
                return vae
        return self.pipeline().vae

    def schedule(self):
        """The model's noise schedule, read from its scheduler config without loading weights where it can."""
        from vfx.diffusion.ddim import Schedule

        config = scheduler_config(self.model) if self._pipe is None else None
        return Schedule.from_config(config) if config is not None else Schedule.from_pipeline(self.pipeline())

    def folder(self, *parts: str) -> Path:
        return self.project.path(*parts)
