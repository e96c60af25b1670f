"""Shared helpers for the benchmarks: run one configuration in a child process, measure, tabulate.

Each configuration runs in its own process so that its peak RSS is its own. Ratios compare
numbers measured in the same run of a script (the machines are noisy).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_child(script: str, config: dict) -> dict:
    """Run `script --worker CONFIG_JSON` and return the JSON it prints last."""
    env = dict(os.environ, PYTHONPATH=str(REPO), VFX_QUIET="1")
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(config)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed for {config}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_project(frames: int, size: int = 64, chunk: int = 8, model: str = "tiny") -> Path:
    """A fresh project with `frames` generated frames, extracted (outside any timing)."""
    from vfx.media import Selection, synthetic_video
    from vfx.project import Project
    from vfx.stages.extract import extract

    root = Path(tempfile.mkdtemp(prefix="vfx-bench-"))
    video = synthetic_video(root / "clip.mp4", frames=frames, size=size, fps=24)
    project = Project.init(root / "p", {"model": model, "chunk_frames": chunk, "size": f"{size}x{size}"})
    extract(project, video, (size, size), None, "cover", Selection(), chunk)
    return project.root


def settings(root: Path):
    from vfx.settings import Settings

    return Settings.resolve(root)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    began = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - began, result


def unet_seconds_per_frame(pipe, batch: int, size: int, repeats: int = 5, warmup: int = 3) -> float:
    """Time of one frame-evaluation of the bare UNet (no hooks), at a given batch size: the median call
    after `warmup` calls (the first calls at a new shape run slower)."""
    import torch

    from vfx.diffusion.text import encode_prompt

    unet = pipe.unet
    x = torch.randn(batch, unet.config.in_channels, size // 8, size // 8, dtype=unet.dtype)
    condition = encode_prompt(pipe, "", (size, size)).repeat(batch).unet_kwargs()
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            unet(x, 500, **condition)
        for _ in range(repeats):
            began = time.perf_counter()
            unet(x, 500, **condition)
            times.append(time.perf_counter() - began)
    return statistics.median(times) / batch


def table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    out = [title, "", line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(row) for row in cells[1:]])


def entry(worker, main) -> None:
    """`script --worker CONFIG` runs one configuration and prints its JSON; plain `script` runs main."""
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        main()
