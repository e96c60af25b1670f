"""Train step time and peak RSS of `vfx train` on the embedded tiny model: full vs LoRA, with and
without gradient checkpointing. Each configuration runs in its own process, so its peak RSS is its own
(os.wait4 reports the child's maximum resident set). Step time is the median `step_seconds` that the
training loop logs to metrics.jsonl, after the first steps (warm-up) are dropped.

    python bench/bench_train.py [--resolution 256] [--steps 8] [--threads 1]

One torch thread by default: on a shared, busy CPU, OpenMP threads spinning for each other distort
timings badly. Peak RSS includes Python, torch and the model (the same for every row); the difference
between rows is what the mode and checkpointing cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [
    ("full", []),
    ("full + checkpointing", ["--gradient-checkpointing"]),
    ("lora", ["--mode", "lora"]),
    ("lora + checkpointing", ["--mode", "lora", "--gradient-checkpointing"]),
]


def photos(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


def run(root: Path, name: str, extra: list[str], instance: Path, args, env: dict) -> dict:
    command = [sys.executable, "-m", "vfx", "--quiet", "train", str(root), "--name", name, "--instance-dir",
               str(instance), "--instance-prompt", "a photo of zwx dog", "--max-steps", str(args.steps),
               "--checkpoint-every", str(args.steps), "--eval-pairs", "0", "--resolution", str(args.resolution),
               "--device", "cpu", "--force", *extra]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr.read()}")
    lines = [json.loads(line) for line in (root / "dreambooth" / name / "metrics.jsonl").read_text().splitlines()]
    times = [m["step_seconds"] for m in lines if "step_seconds" in m][args.warmup :]
    return {"step_ms": 1000 * statistics.median(times), "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=256, help="training side in pixels")
    parser.add_argument("--steps", type=int, default=8, help="training steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads")
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO), VFX_QUIET="1")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        env.setdefault("VFX_CACHE_DIR", str(scratch / "cache"))
        root = scratch / "proj"
        subprocess.run([sys.executable, "-m", "vfx", "init", str(root)], env=env, check=True, capture_output=True)
        instance = photos(scratch / "photos")
        rows = [(label, run(root, f"bench-{i}", extra, instance, args, env)) for i, (label, extra) in enumerate(CONFIGS)]
    print(f"vfx train on the tiny model, {args.resolution} px, batch 1, no prior, {args.threads} thread(s), "
          f"median of steps {args.warmup + 1}-{args.steps}")
    print(f"{'configuration':<24} {'step (ms)':>10} {'peak RSS (MB)':>14}")
    for label, row in rows:
        print(f"{label:<24} {row['step_ms']:>10.1f} {row['peak_rss_mb']:>14.0f}")


if __name__ == "__main__":
    main()
