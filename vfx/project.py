"""The project directory: `vfx.toml` defaults, stage folders and user-given names."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfx.errors import BadInput
from vfx.fsutil import atomic_write_text

CONFIG_NAME = "vfx.toml"

# Project defaults written by `vfx init`; flags override them for one run.
DEFAULTS: dict[str, Any] = {
    "model": "tiny",
    "size": "auto",  # the source's aspect ratio, short side the model's native size (or the source's)
    "fit": "cover",  # how an explicit size is reached: cover (crop) | contain | stretch
    "max_frames": 0,  # 0: all frames
    "chunk_frames": 8,
    "seed": 0,
    "device": "auto",
    "dtype": "auto",
    "prompt": "",  # the inversion / source prompt
    "steps": 50,  # the editing schedule: the steps `invert` saves and `edit` denoises with
}

# The type and range of each vfx.toml key ("video" has no default: `vfx init --video` sets it).
SCHEMA: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "model": (str, None),
    "size": (str, None),
    "fit": (str, lambda v: v in ("cover", "contain", "stretch")),
    "max_frames": (int, lambda v: v >= 0),
    "chunk_frames": (int, lambda v: v >= 1),
    "seed": (int, lambda v: v >= 0),
    "device": (str, None),
    "dtype": (str, None),
    "prompt": (str, None),
    "steps": (int, lambda v: v >= 1),
    "video": (str, None),
}
RANGES = {"fit": "cover, contain or stretch", "max_frames": "0 (all) or more", "chunk_frames": "at least 1", "seed": "0 or more", "steps": "at least 1"}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")

EMPTY_PROMPT = ("the inversion prompt is empty: describe the source video (`vfx init --prompt` or `vfx invert "
                "--prompt`, e.g. 'a woman running'); it conditions the source branch, whose features are injected "
                "into the edit and whose attention gives the correspondences")


def validate_name(name: str, what: str = "name") -> str:
    """A user-given name that becomes a folder: no separators, no '..', no leading dot."""
    if not _NAME_RE.match(name or "") or ".." in name:
        raise BadInput(
            f"invalid {what} {name!r}: use letters, digits, '.', '_', '+', '-' "
            "(no path separators, no '..', no leading dot, at most 100 characters)"
        )
    return name


def slugify(text: str, limit: int = 40) -> str:
    """A folder-safe name derived from free text (e.g. a prompt)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return slug or "edit"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def checked_config(data: dict, path: Path) -> dict[str, Any]:
    """The [project] table of vfx.toml, each value checked against SCHEMA; an unknown key is warned
    about with the nearest known one, and ignored."""
    import difflib

    from vfx import log

    table = data.get("project", {})
    if not isinstance(table, dict):
        raise BadInput(f"{path}: [project] must be a table of key = value lines")
    checked = {}
    for key, value in table.items():
        if key not in SCHEMA:
            near = difflib.get_close_matches(key, list(SCHEMA), n=1)
            log.warn(f"{path}: unknown key {key!r} ignored" + (f"; did you mean {near[0]!r}?" if near else ""))
            continue
        kind, valid = SCHEMA[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (valid is not None and not valid(value)):
            expected = kind.__name__ + (f", {RANGES[key]}" if key in RANGES else "")
            raise BadInput(f"{path}: {key} = {value!r} is invalid: expected {expected}")
        checked[key] = value
    return checked


@dataclass
class Project:
    root: Path
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | Path) -> "Project":
        root = Path(root)
        path = root / CONFIG_NAME
        if not root.is_dir():
            raise BadInput(f"{root} is not a directory; create a project with `vfx init {root}`")
        if not path.is_file():
            raise BadInput(f"{root} is not a vfx project (no {CONFIG_NAME}); run `vfx init {root}`")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise BadInput(f"{path} is not valid TOML: {exc}") from None
        config = dict(DEFAULTS)
        config.update(checked_config(data, path))
        return cls(root.resolve(), config)

    @classmethod
    def init(cls, root: str | Path, overrides: dict[str, Any], force: bool = False) -> "Project":
        root = Path(root)
        path = root / CONFIG_NAME
        if path.exists() and not force:
            raise BadInput(f"{path} exists already; pass --force to rewrite its defaults")
        if root.exists() and not root.is_dir():
            raise BadInput(f"{root} exists and is not a directory")
        config = dict(DEFAULTS)
        config.update({k: v for k, v in overrides.items() if v is not None})
        root.mkdir(parents=True, exist_ok=True)
        lines = ["# vfx project defaults; a command-line flag overrides a value for one run.", "[project]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in config.items()]
        atomic_write_text(path, "\n".join(lines) + "\n")
        return cls(root.resolve(), config)

    def get(self, key: str, override: Any = None) -> Any:
        """A flag's value when given, else the project default."""
        return self.config.get(key) if override is None else override

    def path(self, *parts: str) -> Path:
        """A path inside the project; refuses anything that would leave it."""
        target = self.root.joinpath(*parts)
        resolved = target.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise BadInput(f"{'/'.join(parts)} would leave the project directory")
        return target
