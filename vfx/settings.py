"""The run settings of a model stage: flags resolved against vfx.toml, and the model loaded on demand."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vfx import log
from vfx.distributed import local_device
from vfx.models import ModelRef, load_pipeline, resolve_model, scheduler_config
from vfx.project import Project
from vfx.runtime import dtype_name, resolve_device, resolve_dtype
from vfx.stage import Shard


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
        return cls(project, ref, resolved_device, resolved_dtype, shard_spec, force, model_config)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def pipeline(self):
        if self._pipe is None:
            with log.err.status("loading model"):
                self._pipe = load_pipeline(self.model, self.device, self.dtype, self.model_config)
        return self._pipe

    def schedule(self):
        """The model's noise schedule, read from its scheduler config without loading weights where it can."""
        from vfx.diffusion.ddim import Schedule

        config = scheduler_config(self.model) if self._pipe is None else None
        return Schedule.from_config(config) if config is not None else Schedule.from_pipeline(self.pipeline())

    def folder(self, *parts: str) -> Path:
        return self.project.path(*parts)
