"""`vfx status`: every stage's state, built from the stage records alone."""

from __future__ import annotations

from pathlib import Path

from vfx import graph
from vfx.project import Project
from vfx.stage import DONE_DIR, RECORD, StageFolder
from vfx.store import folder_size


def _record_folders(root: Path) -> list[Path]:
    found = []
    for depth in ("*", "*/*", "*/*/*"):
        found += [p.parent for p in root.glob(f"{depth}/{RECORD}") if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(set(found))


def stage_states(project: Project, verify: bool = False) -> list[dict]:
    """One row per stage folder; with `verify`, done units are read back and damaged ones listed."""
    root = project.root
    folders = _record_folders(root)
    rows: dict[str, dict] = {}
    for folder in folders:
        rel = str(folder.relative_to(root))
        sf = StageFolder(folder)
        rec = sf.record() or {}
        units = int(rec.get("units", 0) or 0)
        done = len(sf.done_units() & set(range(units))) if units else 0
        state = rec.get("state", "damaged")
        if state == "running":
            state = "partial"
        rows[rel] = {
            "folder": rel,
            "stage": rec.get("stage", "?"),
            "state": state,
            "done": units if state == "complete" else done,
            "units": units,
            "params": rec.get("params", {}),
            "inputs": rec.get("inputs", {}),
            "fingerprint": rec.get("fingerprint"),
            "artifacts": rec.get("artifacts", {}),
            "seconds": rec.get("seconds"),
            "finished": rec.get("finished"),
            "bytes": folder_size(folder),
            "summary": rec.get("summary", {}),
        }
        if verify and rec:
            rows[rel]["damaged_units"] = _damaged(sf, units, state)

    def stale(rel: str, seen: frozenset = frozenset()) -> bool:
        """Whether an input artifact of `rel` changed, is missing, or is itself stale (recursively)."""
        row = rows.get(rel)
        if row is None or rel in seen:
            return True
        for key, fp in row["inputs"].items():
            owner = graph.owner_of(key, list(rows))
            if owner is None:
                return True
            folder, artifact = owner
            up = rows[folder]
            if up["artifacts"].get(artifact) != fp or up["state"] != "complete" or stale(folder, seen | {rel}):
                return True
        return False

    for rel, row in rows.items():
        if row["state"] == "complete" and stale(rel):
            row["state"] = "stale"
    for row in rows.values():  # after staleness: damage is repaired by a rerun, with the same fingerprint
        if row.get("damaged_units"):
            row.update(state="damaged", done=row["done"] - len(row["damaged_units"]))
    ordered = []
    for stage in graph.PIPELINE:
        row = graph.spec(stage)
        ordered.append(rows.pop(row.folder, None) or {"folder": row.folder, "stage": stage, "state": "missing",
                                                      "hint": row.command_for(root)})
    ordered += [rows[key] for key in sorted(rows)]
    return ordered


def _damaged(folder: StageFolder, units: int, state: str) -> list[int]:
    """Units whose data no longer matches their marker; a complete stage also needs every marker."""
    damaged = set(folder.damaged_units(range(units)))
    if state == "complete" and (folder.folder / DONE_DIR).is_dir():
        damaged |= set(range(units)) - folder.done_units()
    return sorted(damaged)


# Parameters too long or too technical for a one-line summary; `vfx inspect` shows them all.
HIDDEN_PARAMS = {"source", "source_id", "model", "dtype", "keyframes", "negative_prompt", "chunk_frames", "videos"}


def _short(value) -> str:
    """A dict parameter (e.g. control) as its set values only: canny/100/200."""
    if isinstance(value, dict):
        return "/".join(str(v) for v in value.values() if v not in (None, "", [], {}) and not isinstance(v, dict))
    return str(value)


def key_params(params: dict, limit: int = 70) -> str:
    parts = [f"{key}={_short(value)}" for key, value in params.items()
             if key not in HIDDEN_PARAMS and value not in (None, "", [], {})]
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"
