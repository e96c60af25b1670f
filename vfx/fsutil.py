"""Atomic small-file writes and inter-process locks."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _default_mode() -> int:
    """The mode a plain open() would give a new file (0666 minus the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _default_mode()


# What a write killed between its create and its rename leaves behind: Zarr's `KEY.<uuid hex>.partial`
# chunk files and atomic_write_bytes' `.NAME.<random>.tmp` files.
TORN_WRITE = re.compile(r"(\.[0-9a-f]{32}\.partial|^\..+\.[a-z0-9_]{8}\.tmp)$")


def remove_torn_writes(folder: Path) -> None:
    """Delete the temporary files of writes killed mid-way under `folder`.

    Only safe when nothing else writes there (a stage completing under its lock, every unit done)."""
    for path in list(Path(folder).rglob("*")):
        if TORN_WRITE.search(path.name) and path.is_file():
            path.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600 files; artifacts are meant to be shared
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def regular_file(path: Path, what: str) -> Path:
    """`path` if it is a regular file; a FIFO, device or socket is refused before anything reads it
    (reading a FIFO would wait forever)."""
    import stat

    from vfx.errors import BadInput

    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        raise BadInput(f"{what} {path}: no such file") from None
    if not stat.S_ISREG(mode):
        raise BadInput(f"{what} {path} is not a regular file (a FIFO, device or socket?); give a file")
    return path


def output_file(path: Path, what: str, suffix: str) -> Path:
    """Where a command will write a file, checked before any work: a name without `suffix`, or a folder,
    FIFO or device already there, is refused (writing to a FIFO would wait forever)."""
    from vfx.errors import BadInput

    path = Path(path)
    if path.suffix.lower() != suffix:
        raise BadInput(f"{what} {path}: give a {suffix} file name")
    if (path.exists() or path.is_symlink()) and not path.is_file():
        raise BadInput(f"{what} {path} is not a regular file (a folder, FIFO or device?); give a {suffix} file name")
    return path


def read_json(path: Path) -> Any | None:
    """The JSON in `path`, or None when it is missing or unreadable (a torn write)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock shared by every process of every shard."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def replace_path(new: Path, final: Path) -> None:
    """Move `new` (a file or a folder) to `final`, replacing whatever is there.

    A folder cannot be renamed over another, so the old one steps aside to `.NAME.old` first; a crash
    in between leaves it there, and `restore_aside` (called first here) puts it back.
    """
    new, final = Path(new), Path(final)
    restore_aside(final)
    old = _aside(final)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    _remove(old)


def restore_aside(final: Path) -> None:
    """Undo a `replace_path` that died between its two renames: the old `final` comes back."""
    old = _aside(Path(final))
    if old.exists() and not Path(final).exists():
        os.replace(old, final)
    _remove(old)


def _aside(final: Path) -> Path:
    return final.parent / f".{final.name}.old"


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
