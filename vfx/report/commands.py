"""The command that makes a stage's artifacts again, rebuilt from its record's parameters.

Every recorded parameter that a flag sets is written out, so the command gives the same fingerprint
whatever vfx.toml says. What a record keeps only as a hash (a model folder other than vfx.toml's, a
LoRA or CLIP file, a keyframe file) is written as a placeholder in capitals: MODEL, LORA, CLIP,
CONTROLNET, KEYFRAMES.json.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from vfx import graph


def model_spec(identity: str | None, known: dict[str, str]) -> str:
    """`--model` for a recorded model identity: a known spec (vfx.toml's), the tiny model's name, a Hub
    id, else MODEL."""
    identity = identity or ""
    if identity in known:
        return known[identity]
    if identity.startswith("tiny") and "@" in identity:
        return identity.split("@")[0]
    if identity.startswith("hub:"):
        return identity.split(":")[1]
    return "MODEL"


def _opts(*pairs) -> list:
    """Flags with values, leaving out those the record does not hold (None)."""
    return [item for flag, value in pairs if value is not None for item in (flag, value)]


def _position(value) -> str:
    """A recorded start/end (["frame", 30.0] or ["seconds", 1.5]) as the flag takes it: 30 or 1.5s."""
    kind, number = value
    return f"{number:g}s" if kind == "seconds" else str(int(number))


def _extract(p: dict, name, known) -> list:
    size = f"{p['size'][0]}x{p['size'][1]}" if p.get("size") else None
    flags = _opts(("--video", p.get("source") or "FILE"), ("--size", size),
                  ("--start", _position(p["start"]) if p.get("start") else None),
                  ("--end", _position(p["end"]) if p.get("end") else None))
    if p.get("fps") is not None:
        flags += ["--fps", p["fps"]]
    elif p.get("stride", 1) != 1:
        flags += ["--stride", p["stride"]]
    return flags + _opts(("--max-frames", p.get("max_frames")))


def _invert(p: dict, name, known) -> list:
    flags = _opts(("--steps", p.get("steps")), ("--save-steps", p.get("save_steps")), ("--prompt", p.get("prompt")))
    if p.get("reconstruction") is False:
        flags.append("--no-reconstruction")
    return flags + _opts(("--model", model_spec(p.get("model"), known)), ("--dtype", p.get("dtype")))


def _edit(p: dict, name, known) -> list:
    flags = _opts(("--name", name), ("--prompt", p.get("prompt")), ("--negative-prompt", p.get("negative_prompt")),
                  ("--guidance", p.get("guidance")), ("--steps", p.get("steps")), ("--batch-size", p.get("batch_size")),
                  ("--method", p.get("method")))
    if p.get("method") == "pnp":
        flags += _opts(("--pnp-attn-t", p.get("pnp_attn_t")), ("--pnp-f-t", p.get("pnp_f_t")))
    if p.get("sdedit"):
        flags += _opts(("--start", p["sdedit"].get("start"))) + (["--fresh-noise"] if p["sdedit"].get("fresh_noise") else [])
    control = p.get("control")
    if control:
        own = str(control.get("model", "")).endswith("/controlnet")  # the tiny model's own ControlNet
        flags += _opts(("--control", control.get("kind")), ("--control-model", None if own else "CONTROLNET"),
                       ("--control-scale", control.get("scale")), ("--canny-low", control.get("low")),
                       ("--canny-high", control.get("high")))
    flags += _opts(("--correspondence", p.get("correspondence")))
    if p.get("lora"):
        flags += _opts(("--lora", "LORA"), ("--lora-scale", p["lora"].get("scale")))
    flags += _opts(("--seed", p.get("seed")), ("--propagation", p.get("propagation")),
                   ("--keyframes", "KEYFRAMES.json" if p.get("keyframes") else None))
    return flags + _opts(("--model", model_spec(p.get("model"), known)), ("--dtype", p.get("dtype")))


def _decode(p: dict, name, known) -> list:
    flags = [] if name in (None, "source") else ["--edit", name]
    if p.get("png"):
        flags.append("--png")
    return flags + _opts(("--model", model_spec(p.get("model"), known)))


def _eval(p: dict, name, known) -> list:
    flags = ["--inversion"] if p.get("target") == "reconstruction" else ["--edit", name]
    if p.get("clip"):
        flags += _opts(("--clip", "CLIP"), ("--prompt", p.get("prompt")))
    return flags


BUILDERS = {
    "extract": _extract,
    "encode": lambda p, name, known: _opts(("--model", model_spec(p.get("model"), known))),
    "invert": _invert,
    "flow": lambda p, name, known: _opts(("--preset", p.get("preset"))),
    "edit": _edit,
    "decode": _decode,
    "eval": _eval,
}


def _word(value) -> str:
    return shlex.quote(str(value))


def reproduce(root: Path, row: dict, known_models: dict[str, str] | None = None) -> str:
    """The shell command that makes the stage of a `vfx status` row: its recorded parameters as flags
    (a missing stage: the command that starts it). `known_models` maps model identities to specs."""
    stage = row.get("stage")
    if stage not in graph.STAGES:  # an unreadable record
        return ""
    found = graph.stage_of_folder(row["folder"])
    name = found[1] if found else None
    builder = BUILDERS.get(stage)
    if row.get("state") == "missing" or builder is None:  # DreamBooth stages: the graph's command, placeholders and all
        return graph.spec(stage).command_for(_word(root), name)
    flags = builder(row.get("params") or {}, name, known_models or {})
    return " ".join(["vfx", stage, _word(root)] + [_word(flag) for flag in flags])
