"""The stage graph, declared once: each stage's folder, its artifacts, the stages it reads and the command
that makes it. `upstream()`, `vfx status`, `vfx plan`, decode and eval read this table; adding a stage
means adding a row.

A stage depends on the artifacts it reads, not on every parameter of the stage that wrote them: each
artifact has its own fingerprint (the stage's parameters less those the artifact ignores, the stage's
inputs and unit count), recorded in the stage's record under `artifacts`. A downstream stage records
`{"FOLDER/ARTIFACT": fingerprint}` as its inputs, so rerunning `invert --no-reconstruction` (the same
trajectory) leaves every edit up to date.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from vfx.errors import BadInput
from vfx.project import validate_name

WHOLE = "."  # an artifact that is the whole stage folder (train's weights)


@dataclass(frozen=True)
class Artifact:
    path: str  # relative to the stage folder
    ignores: tuple[str, ...] = ()  # parameters of the stage that do not change this artifact


@dataclass(frozen=True)
class StageSpec:
    stage: str  # the command's name
    folder: str  # inside the project; `{name}` for named stages (edits, runs)
    command: str  # what makes it; `{dir}` the project, `{name}` the name
    artifacts: tuple[Artifact, ...]
    upstream: tuple[str, ...] = ()  # stages whose artifacts it may read
    unit: str = "chunk"  # chunk | pair | image | step | single: what one unit of work is
    default_name: str | None = None  # the name a named stage takes when none is given
    default_command: str | None = None  # the command for the default name

    @property
    def shardable(self) -> bool:
        return self.unit in {"chunk", "pair", "image"}

    @property
    def named(self) -> bool:
        return "{name}" in self.folder

    def folder_for(self, name: str | None = None) -> str:
        if not self.named:
            return self.folder
        name = name or self.default_name
        if not name:
            raise BadInput(f"{self.stage} needs --name")
        return self.folder.format(name=validate_name(name, "name"))

    def command_for(self, root: Path | str, name: str | None = None) -> str:
        name = name or self.default_name
        template = self.default_command if name == self.default_name and self.default_command else self.command
        return template.format(dir=root, name=name)



FLOW_ARRAYS = ("forward", "backward", "occlusion_forward", "occlusion_backward")  # flow/NAME.zarr
_FLOW = tuple(Artifact(f"{name}.zarr") for name in FLOW_ARRAYS)

STAGES: dict[str, StageSpec] = {spec.stage: spec for spec in (
    StageSpec("extract", "frames", "vfx extract {dir} VIDEO", (
        Artifact("frames.zarr"), Artifact("audio.m4a", ignores=("size", "chunk_frames"))), unit="single"),
    StageSpec("encode", "latents", "vfx encode {dir}", (Artifact("latents.zarr"),), ("extract",)),
    StageSpec("depth", "depth", "vfx depth {dir}", (Artifact("depth.zarr"),), ("extract",)),
    StageSpec("invert", "inversion", "vfx invert {dir}", (
        Artifact("trajectory.zarr", ignores=("reconstruction", "reconstruction_grid")),
        Artifact("reconstruction_latents.zarr"),
        Artifact("reconstruction.zarr"), Artifact("reconstruction.mp4")), ("encode", "depth")),
    StageSpec("flow", "flow", "vfx flow {dir}", _FLOW, ("extract",), unit="pair"),
    StageSpec("edit", "edits/{name}", "vfx edit {dir} --name {name} --prompt ...",
              (Artifact("latents.zarr"), Artifact("control.zarr")), ("invert", "flow", "extract", "encode", "depth"), unit="step"),
    StageSpec("decode", "decoded/{name}", "vfx decode {dir} --edit {name}",
              (Artifact("frames.zarr"), Artifact("video.mp4")), ("encode", "edit", "extract"),
              default_name="source", default_command="vfx decode {dir}"),
    StageSpec("eval", "eval/{name}", "vfx eval {dir} --edit {name}", (Artifact("parts"),),
              ("decode", "extract", "flow", "invert"), default_name="source"),
    StageSpec("regularize", "dreambooth/{name}/class", "vfx regularize {dir} --name {name} --class-prompt ...",
              (Artifact("manifest.json"),), unit="image"),
    StageSpec("train", "dreambooth/{name}/weights",
              "vfx train {dir} --name {name} --instance-dir PHOTOS --instance-prompt '...'",
              (Artifact(WHOLE),), ("regularize",), unit="single"),
    StageSpec("sample", "dreambooth/{name}/samples", "vfx sample {dir} --name {name} --prompt ...",
              (Artifact("manifest.json"),), ("train",), unit="image"),
)}

# The video pipeline's unnamed stages, in the order `vfx status` lists them (with a depth model:
# depth before the inversion).
PIPELINE = ("extract", "encode", "invert", "flow")
DEPTH_PIPELINE = ("extract", "encode", "depth", "invert", "flow")
SHARDABLE = tuple(name for name, spec in STAGES.items() if spec.shardable)


def spec(stage: str) -> StageSpec:
    return STAGES[stage]


def artifact_key(folder: str, artifact: str) -> str:
    """How a downstream record names an upstream artifact: FOLDER/ARTIFACT (the folder alone for WHOLE)."""
    return folder if artifact == WHOLE else f"{folder}/{artifact}"


def stage_of_folder(rel: str) -> tuple[str, str | None] | None:
    """(stage, name) of the stage whose folder is `rel` (relative to the project), or None."""
    parts = rel.split("/")
    for row in STAGES.values():
        template = row.folder.split("/")
        if len(template) != len(parts):
            continue
        names = [p for t, p in zip(template, parts) if t == "{name}"]
        if all(t == p for t, p in zip(template, parts) if t != "{name}"):
            return row.stage, names[0] if names else None
    return None


def owner_of(key: str, folders: list[str]) -> tuple[str, str] | None:
    """(folder, artifact) of an input key among known stage folders (the longest folder that holds it)."""
    for folder in sorted(folders, key=len, reverse=True):
        if key == folder:
            return folder, WHOLE
        if key.startswith(folder + "/"):
            return folder, key[len(folder) + 1:]
    return None
