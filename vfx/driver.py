"""The stage driver: the one way every stage runs.

A stage supplies only what is its own: its `StageRun` (parameters, upstream fingerprints and unit count:
cheap facts, so the up-to-date check loads no model), how to prepare (load models, check inputs),
how to create its empty outputs, do one unit, name the parts a unit stored, and finalize. The driver
does the rest, in this order:

1. `--force`, then the up-to-date check (record first, stored bytes second);
2. prepare, before anything on disk changes, so a bad model or option loses nothing (and before it,
   when the run would start over what is there, its upstreams are read back against their checksums);
3. start: fresh outputs when new, stale or forced; the pending units of this shard;
4. the unit loop, each unit marked done with a checksum of the bytes it stored;
5. finish (complete once every unit of every shard is done) and the standard result document.

Variants of the same driver: a single unit built aside and swapped in whole (`SingleUnitStage`:
extract, train; step 3-5 become `build_aside`), and sequential steps (edit overrides `pending`, `mark`
and `finish`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

from vfx import graph, locks, log
from vfx.fsutil import replace_path, restore_aside
from vfx.errors import VfxError
from vfx.stage import (
    NonFinite, Part, StageRun, check_upstreams_unchanged, file_parts, parts_checksum, refuse_links,
)


class Stage:
    """What one stage supplies to the driver. Subclasses set `run` and `label` in their constructor."""

    run: StageRun
    label: str
    unit_name = "chunks"
    steps_per_unit = 0  # > 0: the progress bar counts these steps, which `do_unit` advances

    def prepare(self) -> None:
        """Load models and check inputs; runs only when there is work, before anything is written."""

    def create(self) -> None:
        """Make fresh, empty outputs (a new, stale or forced run)."""

    def do_unit(self, unit: int, bar: log.Bar) -> None:
        raise NotImplementedError

    def parts(self, unit: int) -> list[Part]:
        """Where unit `unit` stored its results (checksummed into its marker)."""
        raise NotImplementedError

    def finalize(self) -> dict:
        """The summary, once every unit is done (runs in the process that completes the stage)."""
        return {}

    def report(self, summary: dict) -> dict:
        """Extra fields of the result document, from the stage's summary ({} while partial)."""
        return {}

    def pending(self) -> list[int]:
        return self.run.start(self.create)

    def session(self) -> contextlib.AbstractContextManager:
        """What the unit loop runs inside (e.g. the edit's attention processors installed)."""
        return contextlib.nullcontext()

    def mark(self, unit: int, parts: list[Part], seconds: float) -> None:
        self.run.mark_done(unit, checked_checksum(self, unit, parts), seconds, parts=parts)

    def finish(self) -> bool:
        return self.run.finish(self.finalize)


def checked_checksum(stage: Stage, unit: int, parts: list[Part]) -> str:
    """The checksum of a unit's stored bytes; a unit that stored NaN or inf stops the stage unmarked."""
    try:
        return parts_checksum(stage.run.path, parts, require_finite=True)
    except NonFinite as exc:
        what = "step" if stage.unit_name == "steps" else "unit"
        raise VfxError(f"{stage.label}: {what} {unit} produced non-finite values ({exc}); nothing of it was "
                       "marked done — check the options (guidance, scales) and the inputs") from None


def drive(stage: Stage) -> dict:
    """Run `stage` under the contract; returns its result document."""
    try:
        return _drive(stage)
    finally:
        locks.release_all()  # the upstream folders held steady since the stage's upstream checks


def _drive(stage: Stage) -> dict:
    run = stage.run
    if run.up_to_date():
        log.info(f"{stage.label}: up to date ({run.path}); pass --force to recompute")
        return outcome(run, True, 0, {"up_to_date": True, **stage.report(_summary(run))})
    run.check_inputs()
    stage.prepare()
    refuse_links(run.path)
    run.hold_run()
    if isinstance(stage, SingleUnitStage):
        return build_aside(stage)
    pending = stage.pending()
    computed = run_units(stage, pending)
    check_upstreams_unchanged()
    complete = stage.finish()
    return outcome(run, complete, computed, {"up_to_date": False, **stage.report(_summary(run) if complete else {})})


def run_units(stage: Stage, pending: list[int]) -> int:
    """Do each pending unit and mark it done with a checksum of the bytes it stored."""
    per_unit = stage.steps_per_unit
    # The bar counts this shard's whole share: units done before (an earlier, interrupted run) count as done.
    mine = len(stage.run.shard.units(stage.run.units))
    scale = per_unit or 1
    total, done = mine * scale, max(mine - len(pending), 0) * scale
    with stage.session(), log.progress(stage.label, total, stage.unit_name, done=done) as bar:
        for unit in pending:
            began = time.perf_counter()
            stage.do_unit(unit, bar)
            stage.mark(unit, stage.parts(unit), round(time.perf_counter() - began, 3))
            if not per_unit:
                bar.advance()
    return len(pending)


def outcome(run: StageRun, complete: bool, computed: int, extra: dict | None = None) -> dict:
    """The standard result document: what this process did and where the stage stands."""
    result = {
        "stage": run.stage,
        "folder": str(run.path),
        "state": "complete" if complete else "partial",
        "computed_units": computed,
        "done_units": run.units if complete else len(run.folder.done_units()),
        "units": run.units,
        "shard": str(run.shard),
        "fingerprint": run.fingerprint,
    }
    result.update(extra or {})
    return result


def _summary(run: StageRun) -> dict:
    return (run.folder.record() or {}).get("summary", {})


class SingleUnitStage(Stage):
    """A stage that is one unit of work: it builds its artifacts in a scratch folder, and the driver swaps
    them in only when complete, so a failure leaves the earlier artifacts untouched."""

    def build(self, scratch: Path) -> dict | None:
        """Write the artifacts into `scratch`; return the summary, or None when stopped before the end."""
        raise NotImplementedError

    def partial_report(self) -> dict:
        """Extra result fields when `build` stopped early."""
        return {}

    def complete(self, summary: dict, started: float, swap_in) -> None:
        """Record the stage complete, swapping the built artifacts in under a running record; every file
        of the artifacts is checksummed into the marker of unit 0 (`vfx status --verify` checks it)."""
        artifacts = [artifact.path for artifact in graph.spec(self.run.stage).artifacts]
        self.run.complete_single(summary, started, swap_in, lambda: file_parts(self.run.path, artifacts))


def build_aside(stage: SingleUnitStage) -> dict:
    """Build a single-unit stage's artifacts in a scratch folder; swap them in once complete."""
    run = stage.run
    artifacts = [artifact.path for artifact in graph.spec(run.stage).artifacts]
    whole = artifacts == [graph.WHOLE]
    folder = run.path
    scratch = folder.parent / f".{folder.name}.partial-{os.getpid()}" if whole else folder / f".partial-{os.getpid()}"
    refuse_links(folder)
    if whole:
        restore_aside(folder)  # an earlier run died mid-swap: its artifacts come back first
    remove_dead_scratch(scratch.parent, scratch.name.rsplit("-", 1)[0])
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    began = time.time()
    try:
        summary = stage.build(scratch)
        check_upstreams_unchanged()
        if summary is None:
            return outcome(run, False, 1, {"up_to_date": False, **stage.partial_report()})

        def swap_in() -> None:
            if whole:
                replace_path(scratch, folder)
                return
            for name in artifacts:
                if (scratch / name).exists():
                    replace_path(scratch / name, folder / name)

        stage.complete(summary, began, swap_in)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return outcome(run, True, 1, {"up_to_date": False, **stage.report(summary)})


def remove_dead_scratch(parent: Path, prefix: str) -> None:
    """Scratch folders `PREFIX-PID` left by killed runs (their process is gone); a live run's stay."""
    for path in parent.glob(f"{prefix}-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process
