"""`vfx status`: every stage's state, built from the stage records alone."""

from __future__ import annotations

from pathlib import Path

from vfx import graph, invocation
from vfx.errors import BadInput
from vfx.models import reads_depth
from vfx.project import Project
from vfx.stage import DONE_DIR, RECORD, StageFolder
from vfx.store import folder_size


def _record_folders(root: Path) -> list[Path]:
    found = []
    for depth in ("*", "*/*", "*/*/*"):
        found += [p.parent for p in root.glob(f"{depth}/{RECORD}") if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(set(found))


def stage_states(project: Project, verify: bool = False, shown_root: str | None = None) -> list[dict]:
    """One row per stage folder; with `verify`, done units are read back and damaged ones listed.

    A row that is not complete says `why` and gives `next`, the command that brings it up to date (the
    recorded command line, the project written as `shown_root`); a complete row lists its `outputs`."""
    root = project.root
    shown_root = shown_root or str(root)
    rows: dict[str, dict] = {}
    for folder in _record_folders(root):
        rel = str(folder.relative_to(root))
        sf = StageFolder(folder)
        rec = sf.record() or {}
        units = int(rec.get("units", 0) or 0)
        done_units = sf.done_units() & set(range(units))
        state = rec.get("state", "damaged")
        if state == "running":
            state = "partial"
        rows[rel] = {
            "folder": rel,
            "stage": rec.get("stage", "?"),
            "state": state,
            "done": units if state == "complete" else len(done_units),
            "units": units,
            "params": rec.get("params", {}),
            "inputs": rec.get("inputs", {}),
            "fingerprint": rec.get("fingerprint"),
            "artifacts": rec.get("artifacts", {}),
            "seconds": rec.get("seconds"),
            "finished": rec.get("finished"),
            "bytes": folder_size(folder),
            "summary": rec.get("summary", {}),
            "recorded_command": rec.get("command"),
            "upstream_params": rec.get("upstream_params", {}),
        }
        if not rec:
            rows[rel]["why"] = f"its record {rel}/{RECORD} cannot be read"
        elif state == "partial":
            rows[rel]["why"] = f"{_units_text(sorted(set(range(units)) - done_units), units)} to do"
        if verify and rec:
            rows[rel]["damaged_units"] = _damaged(sf, units, state)

    def stale(rel: str, seen: frozenset = frozenset()) -> str | None:
        """Why an input artifact of `rel` changed, is missing or is itself out of date (recursively)."""
        row = rows[rel]
        for key, fp in row["inputs"].items():
            owner = graph.owner_of(key, list(rows))
            if owner is None:
                return f"its input {key} is gone"
            folder, artifact = owner
            up = rows[folder]
            if up["state"] != "complete":
                return f"its input {folder} is {up['state']}"
            if up["artifacts"].get(artifact) != fp:
                return f"{key} changed: " + _changes(up["stage"], row["upstream_params"].get(folder), up["params"])
            if folder not in seen and (reason := stale(folder, seen | {rel})):
                return f"its input {folder} is out of date ({reason})"
        return None

    for rel, row in rows.items():
        if row["state"] == "complete" and (reason := stale(rel)):
            row.update(state="stale", why=reason)
    for row in rows.values():  # after staleness: damage is repaired by a rerun, with the same fingerprint
        if row.get("damaged_units"):
            row.update(state="damaged", done=row["done"] - len(row["damaged_units"]),
                       why=f"{_units_text(row['damaged_units'], row['units'])} no longer match their checksums")
    for rel, row in rows.items():
        found = graph.stage_of_folder(rel)
        name = found[1] if found else None
        if row["state"] == "complete":
            row["outputs"] = [f"{rel}/{path}" for path in row["artifacts"] if (root / rel / path).exists()]
            if row["stage"] == "edit" and f"decoded/{name}" not in rows:
                row.update(why="not decoded yet", next=graph.spec("decode").command_for(shown_root, name))
        elif row["stage"] in graph.STAGES:
            row["next"] = remake_command(row, root, shown_root)
    ordered = []
    for stage in video_stages(project):
        spec = graph.spec(stage)
        ordered.append(rows.pop(spec.folder, None) or {"folder": spec.folder, "stage": stage, "state": "missing",
                                                       "hint": spec.command_for(shown_root)})
    ordered += [rows[key] for key in sorted(rows)]
    return ordered


def video_stages(project: Project) -> tuple[str, ...]:
    """The unnamed video stages the project's model runs, in order; a model that no longer resolves
    (moved, say) leaves out depth, and the stages that need it say so when run."""
    try:
        return graph.DEPTH_PIPELINE if reads_depth(project.config.get("model")) else graph.PIPELINE
    except BadInput:
        return graph.PIPELINE


def remake_command(row: dict, root: Path, shown_root: str) -> str:
    """The command that makes (or brings up to date) the stage of a row: the command line its record
    keeps, else the stage's command from the graph (placeholders for what it needs)."""
    found = graph.stage_of_folder(row["folder"])
    return (invocation.rerun_command(row.get("recorded_command"), root, shown_root)
            or graph.spec(row["stage"]).command_for(shown_root, found[1] if found else None))


def _units_text(units: list[int], total: int) -> str:
    """[2, 3, 4, 7] of 10 -> "chunks 2-4, 7 of 0-9"."""
    spans, start = [], None
    for index, unit in enumerate(units):
        start = unit if start is None else start
        if index + 1 == len(units) or units[index + 1] != unit + 1:
            spans.append(f"{start}-{unit}" if unit > start else str(unit))
            start = None
    noun = "chunk" if len(units) == 1 else "chunks"
    return f"{noun} {', '.join(spans)} of 0-{total - 1}" if total > 1 else noun


def _changes(stage: str, before: dict | None, now: dict) -> str:
    """What changed in an upstream stage's parameters since a downstream stage read it."""
    if before is None:
        return f"{stage} was run again since"
    keys = [key for key in {**before, **now} if before.get(key) != now.get(key)]
    if not keys:
        return f"{stage} was run again since (same parameters, new inputs)"
    return f"{stage} was rerun with " + ", ".join(f"{key} {_short(before.get(key))} → {_short(now.get(key))}"
                                                for key in keys)


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


def param_parts(params: dict) -> list[str]:
    return [f"{key}={_short(value)}" for key, value in params.items()
            if key not in HIDDEN_PARAMS and value not in (None, "", [], {})]


def key_params(params: dict, limit: int = 70) -> str:
    text = " ".join(param_parts(params))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def explain(row: dict, width: int = 80) -> list[str]:
    """The lines `vfx status` prints under its table for one row, each at most `width` columns (a long
    command or path stays whole on its own line so it can be copied)."""
    import textwrap

    def wrapped(label: str, text: str, whole: bool = False) -> list[str]:
        if whole:
            return [f"    {label}{text}"]
        return textwrap.wrap(text, width, initial_indent=f"    {label}", subsequent_indent="      ",
                             break_on_hyphens=False) or []

    if row["state"] == "missing":
        return [f"  {row['folder']}: missing", *wrapped("run: ", row.get("hint", ""), whole=True)]
    lines = [f"  {row['folder']}: {row['state']}" + (f": {row['why']}" if row.get("why") else "")]
    lines = textwrap.wrap(lines[0], width, subsequent_indent="      ")
    line = ""
    for part in param_parts(row.get("params", {})):  # whole key=value items per line
        if line and len(line) + 1 + len(part) > width:
            lines.append(line)
            line = ""
        line = f"{line} {part}" if line else f"    {part}"
    lines += [line] if line else []
    if row.get("next"):
        lines += wrapped("run: ", row["next"], whole=True)
    if row.get("outputs"):
        lines += wrapped("out: ", ", ".join(row["outputs"]))
    return lines


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"
