"""What every stage needs: the resolved run settings, upstream checks, chunk loops."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vfx import log
from vfx.distributed import local_device
from vfx.models import ModelRef, load_pipeline, resolve_model
from vfx.project import Project
from vfx.runtime import dtype_name, resolve_device, resolve_dtype
from vfx.stage import Part, Shard, StageRun, array_checksum, parts_checksum


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

    def folder(self, *parts: str) -> Path:
        return self.project.path(*parts)


def run_units(
    run: StageRun,
    pending: list[int],
    work: Callable[[int, log.Bar], list[np.ndarray]],
    label: str,
    steps_per_unit: int = 0,
    unit_name: str = "chunks",
    on_start: Callable[[], object] | None = None,
    parts: Callable[[int], list[Part]] | None = None,
) -> int:
    """Run `work(unit, bar)` for each pending unit, marking each done with a checksum of what it wrote.

    With `parts` (unit -> where it stores its results), the checksum is of the stored bytes read
    back, and the marker names the parts, so `vfx status --verify` and reruns can re-check them;
    without, it is of the arrays `work` returns.
    With `steps_per_unit`, the bar counts those steps (work advances it); else it counts units.
    `on_start` (e.g. loading the model) runs first, only when there is work, outside the bar's timing.
    """
    if pending and on_start:
        on_start()
    total = len(pending) * steps_per_unit if steps_per_unit else len(pending)
    with log.progress(label, total, unit_name) as bar:
        for unit in pending:
            began = time.perf_counter()
            written = work(unit, bar)
            stored = parts(unit) if parts else None
            checksum = parts_checksum(run.path, stored) if stored else array_checksum(written)
            run.mark_done(unit, checksum, round(time.perf_counter() - began, 3), parts=stored)
            if not steps_per_unit:
                bar.advance()
    return len(pending)


def outcome(run: StageRun, complete: bool, computed: int, extra: dict | None = None) -> dict:
    """The result a chunked stage reports: what it did and where the stage stands."""
    done = len(run.folder.done_units())
    result = {
        "stage": run.stage,
        "folder": str(run.path),
        "state": "complete" if complete else "partial",
        "computed_units": computed,
        "done_units": run.units if complete else done,
        "units": run.units,
        "shard": str(run.shard),
        "fingerprint": run.fingerprint,
    }
    result.update(extra or {})
    return result


def up_to_date_result(run: StageRun, extra: dict | None = None) -> dict:
    log.info(f"{run.stage}: up to date ({run.path}); pass --force to recompute")
    return outcome(run, True, 0, {"up_to_date": True, **(extra or {})})
