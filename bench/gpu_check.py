"""The Python half of bench/gpu_check.sh: runs vfx commands in this process (so that the CUDA peak
memory is theirs), reads each stage's own per-unit timings, and prints the markdown table.

    python bench/gpu_check.py env OUT.json
    python bench/gpu_check.py clip OUT.json PROJECT MODEL SIZE FRAMES DEVICE
    python bench/gpu_check.py stage OUT.json KIND:FRAMES:FOLDER -- VFX_ARGS...   (KIND: invert | edit | train | none)
    python bench/gpu_check.py partial OUT.json   (the timings of a stage stopped part-way)
    python bench/gpu_check.py table WORK

Seconds per step come from what the stages record: `invert` marks each frame chunk done with its
seconds (all steps of that chunk), `edit` marks each denoising step done with its seconds, `train` logs
`step_seconds` per optimizer step to metrics.jsonl. The first unit (CUDA warm-up, autotuning) is left
out through the median. Peak memory is torch.cuda.max_memory_allocated over the whole command.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

TRAIN_WARMUP = 3  # optimizer steps left out of the training median

ROWS = [  # part, what it measures
    ("setup", "setup: venv, missing wheels, vfx"),
    ("model", "build SD 1.5 (`vfx model random --arch sd15`)"),
    ("clip", "clip: demo-video, init, extract, encode"),
    ("invert-main", "invert (fixed-point, 2 UNet calls a step)"),
    ("edit-main", "edit (TokenFlow PnP)"),
    ("train-main", "train (DreamBooth LoRA)"),
    ("model-xl", "build SDXL (`vfx model random --arch sdxl`)"),
    ("clip-xl", "SDXL clip: demo-video, init, extract, encode"),
    ("invert-xl", "SDXL invert (fixed-point, 2 UNet calls a step)"),
    ("edit-xl", "SDXL edit (TokenFlow PnP)"),
    ("edit-alt", "edit (TokenFlow PnP)"),
    ("invert-alt", "invert (fixed-point, 2 UNet calls a step)"),
    ("train-alt", "train (DreamBooth LoRA)"),
]


def vfx(args: list[str]) -> int:
    """`vfx ARGS` in this process; its exit status."""
    from vfx.cli import app

    try:
        app([str(a) for a in args], prog_name="vfx")
    except SystemExit as exc:
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    return 0


def cuda_peak_mib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def markers(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((folder / ".done").glob("*.json"))]


def per_step(kind: str, folder: Path, steps: int, frames: int) -> dict:
    """Seconds per step over all frames, from the units the stage has recorded so far."""
    done = [m for m in markers(folder) if m.get("seconds") is not None] if kind in ("edit", "invert") else []
    if kind == "edit" and done:  # one unit per step, every frame
        return {"s_per_step": statistics.median(m["seconds"] for m in done), "units": len(done)}
    if kind == "invert" and done:  # one unit per frame chunk, every step
        per_frame_step = statistics.median(m["seconds"] / sum(p["end"] - p["start"] for p in m["parts"]) / steps
                                           for m in done)
        return {"s_per_step": per_frame_step * frames, "units": len(done)}
    if kind == "train" and (folder / "metrics.jsonl").is_file():
        lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        times = [m["step_seconds"] for m in lines if "step_seconds" in m]
        kept = times[TRAIN_WARMUP:] or times
        return {"s_per_step": statistics.median(kept), "units": len(times)} if kept else {}
    return {}


def steps_of(args: list[str]) -> int:
    for flag in ("--steps", "--max-steps"):
        if flag in args:
            return int(args[args.index(flag) + 1])
    return 1


def measure(out: Path) -> dict:
    """Add the per-step timings to the result file `out` (also after a stage was stopped part-way)."""
    result = json.loads(out.read_text())
    if result["kind"] != "none":
        try:
            result.update(per_step(result["kind"], Path(result["folder"]), steps_of(result["args"]), result["frames"]))
        except (OSError, ValueError, KeyError, ZeroDivisionError) as exc:
            result["note"] = f"no per-step timings: {exc}"
    out.write_text(json.dumps(result, indent=2))
    return result


def stage(out: Path, spec: str, args: list[str]) -> int:
    kind, frames, folder = spec.split(":", 2)
    out.write_text(json.dumps({"kind": kind, "frames": int(frames or 0), "folder": folder, "args": args}))
    began = time.perf_counter()
    rc = vfx(args)
    result = {**json.loads(out.read_text()), "rc": rc, "wall_s": time.perf_counter() - began, "peak_mib": cuda_peak_mib()}
    out.write_text(json.dumps(result, indent=2))
    if rc == 0:
        measure(out)
    return rc


def clip(out: Path, project: Path, model: str, size: int, frames: int, device: str) -> int:
    """A generated clip through init, extract and encode; 3 photos for training beside it."""
    import numpy as np
    from PIL import Image

    began = time.perf_counter()
    work = project.parent
    rc = vfx(["demo-video", work / "clip.mp4", "--frames", frames, "--size", size]) or vfx(
        ["init", project, "--video", work / "clip.mp4", "--size", f"{size}x{size}", "--model", model, "--device", device,
         "--prompt", "a textured disc moving over a gradient"]) or vfx(["extract", project]) or vfx(
        ["encode", project, "--batch-size", 8])
    photos = work / "photos"
    photos.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(photos / f"{index}.png")
    out.write_text(json.dumps({"rc": rc, "wall_s": time.perf_counter() - began, "peak_mib": cuda_peak_mib()}, indent=2))
    return rc


def env(out: Path) -> int:
    import diffusers
    import torch
    import transformers

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), sdpa_backends=", ".join(
            name for name, on in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                                  ("mem-efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                                  ("cudnn", torch.backends.cuda.cudnn_sdp_enabled()),
                                  ("math", torch.backends.cuda.math_sdp_enabled())) if on))
    out.write_text(json.dumps(info, indent=2))
    print(json.dumps(info))
    return 0


def fmt(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def table(work: Path) -> int:
    """The markdown table of whatever parts ran (a part that did not finish says why)."""
    read = lambda path: json.loads(path.read_text()) if path.is_file() else {}  # noqa: E731
    settings = read(work / "settings.json")
    info = read(work / "results" / "env.json")
    print(f"torch {info.get('torch', '?')}, CUDA {info.get('cuda') or 'none'}, GPU: {info.get('gpu', 'none')}, "
          f"diffusers {info.get('diffusers', '?')}, transformers {info.get('transformers', '?')}; "
          f"attention: torch SDPA (enabled backends: {info.get('sdpa_backends', 'n/a')})")
    print(f"model {settings.get('model_label')}, {settings.get('size')}x{settings.get('size')}, "
          f"{settings.get('frames')} frames, {settings.get('steps')} steps (invert and edit), "
          f"LoRA rank 4, batch 1, {settings.get('train_steps')} train steps (median after {TRAIN_WARMUP})"
          + (" — DRY RUN on CPU, tiny model: not a measurement" if settings.get("dry") else ""))
    print(f"SDXL rows: {settings.get('xl_label')}, {settings.get('xl_size')}x{settings.get('xl_size')}, "
          f"{settings.get('xl_frames')} frames, {settings.get('steps')} steps")
    print()
    print("| part | dtype | s/step | steps/s | wall (s) | peak CUDA alloc (MiB) | status |")
    print("|---|---|---|---|---|---|---|")
    for part, label in ROWS:
        result = read(work / "results" / f"{part}.json")
        status_file = work / "status" / part
        status = status_file.read_text().strip() if status_file.is_file() else "not run"
        dtype = settings.get("dtypes", {}).get(part, "")
        step = result.get("s_per_step")
        print(f"| {label} | {dtype} | {fmt(step)} | {fmt(1 / step if step else None)} | {fmt(result.get('wall_s'))} "
              f"| {fmt(result.get('peak_mib') or None, 5)} | {status} |")
    return 0


def main(argv: list[str]) -> int:
    mode, rest = argv[0], argv[1:]
    if mode == "env":
        return env(Path(rest[0]))
    if mode == "clip":
        return clip(Path(rest[0]), Path(rest[1]), rest[2], int(rest[3]), int(rest[4]), rest[5])
    if mode == "stage":
        split = rest.index("--")
        return stage(Path(rest[0]), rest[1], rest[split + 1:])
    if mode == "partial":
        measure(Path(rest[0]))
        return 0
    if mode == "table":
        return table(Path(rest[0]))
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
