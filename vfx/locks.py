"""Stage folders held steady while they are used: advisory locks between vfx processes.

Each stage folder has two lock files:

- `.readers.lock`: a stage that reads an artifact of this folder holds it shared from its upstream
  check to its end; a stage about to rewrite this folder's artifacts (new, stale or forced) takes it
  exclusive for the rewrite. So `vfx encode --force` refuses while an `invert` reads the latents.
- `.NAME.run.lock` beside the folder NAME: a run of the stage holds it, exclusive for a whole-stage
  run, shared for a shard of a job array (shards of one array write disjoint units). It lies beside
  the folder so that a run refused before its first write leaves no folder behind. So two `vfx edit --name same` runs never
  interleave, while SLURM shards still run side by side.

Locks are never waited for: a lock held by another process refuses with exit 75 (retryable), naming
the latest holder's process id and command (written into the lock file). The kernel releases a dead
process's locks.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

from vfx.errors import EXIT_TEMPFAIL, VfxError

READERS = ".readers.lock"

_held: list["Lock"] = []  # locks of this process, released when its command ends


class Busy(VfxError):
    """A folder this command must lock is in use by another vfx process (exit 75: retry later)."""

    exit_code = EXIT_TEMPFAIL


class Lock:
    def __init__(self, path: Path, what: Path, exclusive: bool):
        self.path, self.what, self.exclusive = Path(path), Path(what), exclusive
        self.handle = None
        self.expected: dict[str, str] = {}  # artifact -> fingerprint a reader started from

    def acquire(self, purpose: str) -> "Lock":
        self.handle = open(self.path, "a+")
        mode = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(self.handle.fileno(), mode | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            self.handle = None
            raise Busy(f"{self.what} is in use by {holder(self.path)}; {purpose} must wait for it: rerun once it "
                       "has finished") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv[1:])[:200]}))
        self.handle.flush()
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def holder(path: Path) -> str:
    """Who took the lock last, as 'pid N (vfx COMMAND)'."""
    try:
        info = json.loads(Path(path).read_text())
        return f"pid {info['pid']} (vfx {info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another vfx process"


def hold(folder: Path, exclusive: bool, purpose: str, run: bool = False) -> Lock:
    """Lock the existing stage folder `folder` (its readers' lock; with `run`, its run lock) until
    `release` or `release_all` (the end of the command); Busy when another process holds it."""
    folder = Path(folder)
    path = folder.parent / f".{folder.name}.run.lock" if run else folder / READERS
    for lock in _held:
        if lock.path == path and (lock.exclusive or not exclusive):
            return lock  # this process holds it already
    lock = Lock(path, folder, exclusive).acquire(purpose)
    _held.append(lock)
    return lock


def held() -> list[Lock]:
    return list(_held)


def release(lock: Lock) -> None:
    lock.release()
    if lock in _held:
        _held.remove(lock)


def release_all() -> None:
    while _held:
        _held.pop().release()
