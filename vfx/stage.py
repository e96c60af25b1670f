"""The stage contract: fingerprints, records, chunk completion, shards.

A stage folder holds `stage.json` (the record) and `.done/<unit>.json` markers. A unit of work is
one chunk of frames (or one image); its marker is written only after its data is fully written,
so a crash at any point leaves unfinished units without markers, and a rerun recomputes only
those. Shards own disjoint sets of units, so concurrent processes never write the same chunk.

A marker names the parts a unit stored (`Part`: rows of a Zarr array, or a file) and a SHA-256 of
their bytes as read back after writing, so damage found later (a corrupted or truncated chunk file,
a torn marker) can be detected unit by unit: `vfx status --verify` reports it, and a rerun of the
stage recomputes exactly the damaged units.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

import vfx
from vfx import graph, invocation, locks
from vfx.errors import BadInput, MissingStage, VfxError
from vfx.fsutil import atomic_write_json, file_lock, read_json, remove_torn_writes

RECORD = "stage.json"
DONE_DIR = ".done"
LOCK = ".lock"
SCHEMA = 2  # artifact layout version; part of every fingerprint (2: inputs name upstream artifacts)


def fingerprint(obj: Any) -> str:
    """A stable hash of JSON-able data (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- shards


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, spec: str | None, env: dict[str, str] | None = None) -> "Shard":
        """`K/N` from the flag, else the SLURM array variables, else the whole job."""
        env = os.environ if env is None else env
        if spec:
            try:
                index_text, count_text = spec.split("/")
                index, count = int(index_text), int(count_text)
            except ValueError:
                raise BadInput(f"invalid shard {spec!r}: expected K/N, e.g. 0/4") from None
            return cls.checked(index, count, f"shard {spec!r}")
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            try:
                task = int(env["SLURM_ARRAY_TASK_ID"])
                first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
                step = int(env.get("SLURM_ARRAY_TASK_STEP", "1")) or 1
                count = int(env["SLURM_ARRAY_TASK_COUNT"])
            except ValueError:
                raise BadInput("SLURM_ARRAY_TASK_* variables are not integers") from None
            if (task - first) % step:
                raise BadInput(f"SLURM_ARRAY_TASK_ID={task} is not on the array's step {step} from {first}")
            return cls.checked((task - first) // step, count, "SLURM array task")
        return cls()

    @classmethod
    def checked(cls, index: int, count: int, what: str) -> "Shard":
        if count < 1 or not 0 <= index < count:
            raise BadInput(f"invalid {what}: need 0 <= K < N and N >= 1 (got {index}/{count})")
        return cls(index, count)

    def units(self, total: int) -> range:
        """This shard's contiguous block of units (blocks differ by at most one unit)."""
        base, extra = divmod(total, self.count)
        start = self.index * base + min(self.index, extra)
        return range(start, start + base + (1 if self.index < extra else 0))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


# ---------------------------------------------------------------- unit parts


@dataclass(frozen=True)
class Part:
    """What a unit stored: rows [start, end) along `axis` of a Zarr array, or (no start) a whole file.

    `path` is relative to the stage folder, so markers stay valid when a project is moved.
    """

    path: str
    start: int | None = None
    end: int | None = None
    axis: int = 0

    def read(self, folder: Path) -> Any:
        """The stored bytes (a numpy block or the file's bytes)."""
        if self.start is None:
            return (folder / self.path).read_bytes()
        from vfx.store import open_array

        index = (slice(None),) * self.axis + (slice(self.start, self.end),)
        return np.asarray(open_array(folder / self.path)[index])


def parts_checksum(folder: Path, parts: Iterable[Part], require_finite: bool = False) -> str:
    """SHA-256 over the stored bytes of `parts`, in order. With `require_finite`, a float part holding
    NaN or inf raises NonFinite: such data never becomes part of a complete artifact."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.read(folder)
        if require_finite and not isinstance(data, bytes) and data.dtype.kind == "f" and not np.isfinite(data).all():
            raise NonFinite(part)
        digest.update(data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes())
    return digest.hexdigest()


class NonFinite(VfxError):
    """A unit stored NaN or inf (exit 1): the stage stops before marking it done."""

    def __init__(self, part: Part):
        rows = f" rows {part.start}-{part.end}" if part.start is not None else ""
        super().__init__(f"{part.path}{rows} holds NaN or inf values")
        self.part = part


# ---------------------------------------------------------------- records


class StageFolder:
    """A stage's output folder and what its record says."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @property
    def record_path(self) -> Path:
        return self.folder / RECORD

    def record(self) -> dict | None:
        return read_json(self.record_path)

    def done_units(self) -> set[int]:
        done = set()
        with_dir = self.folder / DONE_DIR
        if with_dir.is_dir():
            for entry in with_dir.iterdir():
                if entry.suffix == ".json" and entry.stem.isdigit():
                    done.add(int(entry.stem))
        return done

    def marker(self, unit: int) -> Path:
        return self.folder / DONE_DIR / f"{unit:06d}.json"

    def check_unit(self, unit: int) -> str:
        """'ok', 'damaged' (torn marker, unreadable or changed data) or 'unverified' (no parts recorded)."""
        marker = read_json(self.marker(unit))
        if not isinstance(marker, dict):
            return "damaged"
        if not marker.get("parts") or not marker.get("sha256"):
            return "unverified"
        try:
            parts = [Part(**entry) for entry in marker["parts"]]
            stored = parts_checksum(self.folder, parts)
        except Exception:  # noqa: BLE001 - any failure to read stored data back is damage
            return "damaged"
        return "ok" if stored == marker["sha256"] else "damaged"

    def damaged_units(self, units: Iterable[int]) -> list[int]:
        """The done units among `units` whose stored data no longer matches their marker."""
        done = self.done_units()
        return [unit for unit in sorted(units) if unit in done and self.check_unit(unit) == "damaged"]

    def is_complete(self) -> bool:
        return is_complete(self.record())


def is_complete(record: Any) -> bool:
    """Whether a stage record says its stage finished."""
    return isinstance(record, dict) and record.get("state") == "complete"


@dataclass(frozen=True)
class Upstream:
    """An artifact of a complete upstream stage, as a downstream stage reads it."""

    key: str  # FOLDER/ARTIFACT: the name under which the downstream record lists it as an input
    fingerprint: str
    record: dict
    folder: Path  # the upstream stage's folder

    def input(self) -> dict[str, str]:
        return {self.key: self.fingerprint}


def upstream(project, stage: str, artifact: str, name: str | None = None) -> Upstream:
    """An artifact of a complete upstream stage, or a MissingStage error naming the command that makes it."""
    row = graph.spec(stage)
    rel = row.folder_for(name)
    folder = project.path(*rel.split("/"))
    label = f"{stage} {name or row.default_name}" if row.named else stage
    if folder.is_symlink():  # its lock file would be written through the link
        raise BadInput(f"{folder} is a symbolic link; stage folders must be real folders inside the project")
    if not folder.is_dir():
        raise MissingStage(label, row.command_for(project.root, name))
    # Held shared until this command ends, so no other vfx process rewrites the artifact meanwhile.
    lock = locks.hold(folder, exclusive=False, purpose=f"reading {rel}")
    record = read_json(folder / RECORD)
    artifact_print = record.get("artifacts", {}).get(artifact) if is_complete(record) else None
    if artifact_print is None:
        raise MissingStage(label, row.command_for(project.root, name))
    lock.expected[artifact] = artifact_print
    return Upstream(graph.artifact_key(rel, artifact), artifact_print, record, folder)


def check_upstreams_unchanged() -> None:
    """Every upstream artifact this command read still has the fingerprint it started from."""
    for lock in locks.held():
        record = read_json(lock.what / RECORD) if lock.expected else None
        for artifact, expected in lock.expected.items():
            now = record.get("artifacts", {}).get(artifact) if is_complete(record) else None
            if now != expected:
                raise VfxError(f"{lock.what / artifact} changed while this stage read it; rerun the command")


def check_upstreams_intact() -> None:
    """Every done unit of every upstream folder this command reads still reads back as its marker recorded;
    else DamagedArtifact, naming the damaged array (or folder) and the command that repairs it. Checked
    before a rewrite deletes anything, so a damaged input loses no output."""
    from vfx.store import DamagedArtifact, repair_hint

    for lock in locks.held():
        if not lock.expected:
            continue
        folder = StageFolder(lock.what)
        units = (folder.record() or {}).get("units")
        for unit in folder.damaged_units(range(units) if isinstance(units, int) else ()):
            names = set()
            try:
                for entry in read_json(folder.marker(unit))["parts"]:
                    part = Part(**entry)
                    names.add(Path(part.path).parts[0])
                    part.read(folder.folder)  # a chunk that fails its CRC-32C raises, naming its array
            except DamagedArtifact:
                raise
            except Exception:  # noqa: BLE001 - a torn marker or a missing file: the message below
                pass
            raise DamagedArtifact(f"{lock.what} is damaged ({', '.join(sorted(names)) or 'its marker'}: unit {unit} "
                                  f"no longer matches its checksum){repair_hint(lock.what / RECORD)}")


def artifact_fingerprints(stage: str, params: dict, inputs: dict, units: int) -> dict[str, str]:
    """One fingerprint per artifact of `stage` (graph.STAGES): what that artifact's bytes depend on."""
    prints = {}
    for artifact in graph.spec(stage).artifacts:
        kept = {key: value for key, value in params.items() if key not in artifact.ignores}
        prints[artifact.path] = fingerprint({"stage": stage, "schema": SCHEMA, "artifact": artifact.path,
                                             "params": kept, "inputs": inputs, "units": units})
    return prints


class StageRun:
    """One run of a stage: decides what to do, tracks completion, writes the record."""

    def __init__(
        self,
        folder: Path,
        stage: str,
        params: dict[str, Any],
        inputs: dict[str, str],
        units: int,
        *,
        force: bool = False,
        shard: Shard | None = None,
    ):
        self.folder = StageFolder(folder)
        self.stage = stage
        self.params = params
        self.inputs = inputs
        self.units = units
        self.force = force
        self.shard = shard or Shard()
        self.fingerprint = fingerprint(
            {"stage": stage, "schema": SCHEMA, "params": params, "inputs": inputs, "units": units}
        )
        self.artifacts = artifact_fingerprints(stage, params, inputs, units)

    @property
    def path(self) -> Path:
        return self.folder.folder

    def _lock(self):
        return file_lock(self.path / LOCK)

    @contextlib.contextmanager
    def rewriting(self):
        """Exclusive use of this folder while its artifacts are started over: refused (exit 75) while
        another vfx process reads them."""
        lock = locks.hold(self.path, exclusive=True, purpose=f"rewriting {self.path.name}")
        try:
            yield
        finally:
            locks.release(lock)

    def hold_run(self) -> None:
        """One run of this stage at a time; shards of one job array (or ranks of one launch) together."""
        together = self.shard.count > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        locks.hold(self.path, exclusive=not together, purpose=f"this {self.stage} run", run=True)

    def up_to_date(self) -> bool:
        """Not forced, complete with this fingerprint, and this shard's units read back intact
        (cheapest first: the record, then the stored bytes)."""
        if self.force:
            return False
        rec = self.folder.record()
        if not is_complete(rec) or rec.get("fingerprint") != self.fingerprint or rec.get("artifacts") != self.artifacts:
            return False
        return not self.folder.damaged_units(self.shard.units(self.units))

    def check_inputs(self) -> None:
        """When this run would start over what is there (stale or forced), every upstream it reads must
        read back intact first: a damaged input then loses no output."""
        rec = self.folder.record()
        if rec and (self.force or rec.get("fingerprint") != self.fingerprint):
            check_upstreams_intact()

    def _new_record(self) -> dict:
        return {
            "stage": self.stage,
            "schema": SCHEMA,
            "version": vfx.__version__,
            "fingerprint": self.fingerprint,
            "artifacts": self.artifacts,
            "params": self.params,
            "inputs": self.inputs,
            "units": self.units,
            "state": "running",
            "started": now(),
            "started_unix": time.time(),
            "command": invocation.recorded(),
            "upstream_params": self._upstream_params(),
        }

    def _upstream_params(self) -> dict[str, dict]:
        """The parameters of each upstream folder this run reads, so `status` can say which changed."""
        if self.stage not in graph.STAGES:
            return {}
        root = self.path.parents[len(graph.spec(self.stage).folder.split("/")) - 1]
        params = {}
        for lock in locks.held():
            if lock.expected and root in lock.what.parents:
                params[str(lock.what.relative_to(root))] = (read_json(lock.what / RECORD) or {}).get("params", {})
        return params

    def start(self, create: Callable[[], None]) -> list[int]:
        """Prepare the artifact (once, whichever shard comes first); return this shard's pending units."""
        refuse_links(self.path)
        with self._lock():
            rec = self.folder.record()
            mine = self.shard.units(self.units)
            if not rec or rec.get("fingerprint") != self.fingerprint or (self.force and self.shard.count == 1):
                # New, stale, or forced for the whole stage: start the artifact over.
                with self.rewriting():
                    shutil.rmtree(self.path / DONE_DIR, ignore_errors=True)
                    create()
                    atomic_write_json(self.folder.record_path, self._new_record())
            else:
                # Forced: redo this shard's units. Otherwise redo only the damaged ones.
                redo = list(mine) if self.force else self.folder.damaged_units(mine)
                if redo:
                    with self.rewriting():
                        for unit in redo:
                            self.folder.marker(unit).unlink(missing_ok=True)
                        if is_complete(rec):
                            rec.update(state="running", started=now(), started_unix=time.time())
                            atomic_write_json(self.folder.record_path, rec)
            done = self.folder.done_units()
        return [unit for unit in mine if unit not in done]

    def mark_done(self, unit: int, checksum: str | None = None, seconds: float | None = None,
                  parts: list[Part] | None = None, **extra: Any) -> None:
        if parts:
            extra["parts"] = [asdict(part) for part in parts]
        atomic_write_json(self.folder.marker(unit), {"sha256": checksum, "seconds": seconds, **extra})

    def marker(self, unit: int) -> dict | None:
        return read_json(self.folder.marker(unit))

    def finish(self, finalize: Callable[[], dict | None] | None = None) -> bool:
        """Complete the stage if every unit is done (by any shard). Returns whether it is complete."""
        with self._lock():
            rec = self.folder.record() or self._new_record()
            if is_complete(rec) and rec.get("fingerprint") == self.fingerprint:
                return True
            if len(self.folder.done_units() & set(range(self.units))) < self.units:
                return False
            summary = finalize() if finalize else None
            remove_torn_writes(self.path)  # a killed earlier run's temporaries: the artifact is what was marked
            finished = time.time()
            rec.update(
                state="complete",
                finished=now(),
                seconds=round(finished - rec.get("started_unix", finished), 3),
                summary=summary or {},
                command=invocation.recorded() or rec.get("command"),
            )
            atomic_write_json(self.folder.record_path, rec)
            return True

    def complete_single(self, summary: dict | None = None, started: float | None = None,
                        swap_in: Callable[[], None] | None = None,
                        parts: Callable[[], list[Part]] | None = None) -> None:
        """Record a single-unit stage (built aside) as complete. `swap_in` moves the new artifact into
        place while the record says running, so a crash mid-swap never leaves a stale "complete";
        `parts` (what the unit stored, once swapped in) are checksummed into unit 0's marker."""
        with self._lock():
            rec = self._new_record()
            if swap_in is not None:
                with self.rewriting():
                    atomic_write_json(self.folder.record_path, rec)
                    swap_in()
            finished = time.time()
            started = started or finished
            rec.update(
                state="complete",
                started_unix=started,
                started=datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
                finished=now(),
                seconds=round(finished - started, 3),
                summary=summary or {},
            )
            shutil.rmtree(self.path / DONE_DIR, ignore_errors=True)
            if parts is not None:
                stored = parts()
                self.mark_done(0, parts_checksum(self.path, stored), parts=stored)
            atomic_write_json(self.folder.record_path, rec)


def file_parts(folder: Path, paths: Iterable[str]) -> list[Part]:
    """Every regular file of `paths` (files or folders, relative to `folder`; "." the whole folder) as a
    whole-file Part, leaving out the stage's own bookkeeping (record, markers, locks)."""
    found = []
    for rel in paths:
        top = Path(folder) / rel
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in files:
            name = str(path.relative_to(folder))
            if path.name == RECORD or path.suffix == ".lock" or name.split("/")[0] == DONE_DIR:
                continue
            found.append(Part(name))
    return found


def refuse_links(folder: Path) -> None:
    """Refuse to write into a stage folder holding symbolic links: writes would follow them out of it."""
    folder = Path(folder)
    if folder.is_symlink():
        raise BadInput(f"{folder} is a symbolic link; stage folders must be real folders inside the project")
    for parent, dirs, files in os.walk(folder):
        for entry in dirs + files:
            if os.path.islink(os.path.join(parent, entry)):
                raise BadInput(f"{os.path.join(parent, entry)} is a symbolic link; vfx does not write through links "
                               "(remove it, then rerun)")


def array_checksum(arrays: Iterable[Any]) -> str:
    """SHA-256 over the bytes of the numpy arrays a unit wrote."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
