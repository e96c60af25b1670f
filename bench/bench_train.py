"""Train step time, peak RSS and checkpoint size of `vfx train` on the embedded tiny model: full vs LoRA,
plain, with gradient checkpointing, with 4 micro-batches of gradient accumulation, and with 8-bit AdamW
(when bitsandbytes is installed). Each configuration runs in its own process, so its peak RSS is its own
(os.wait4 reports the child's maximum resident set). Step time is the median `step_seconds` that the
training loop logs to metrics.jsonl (one optimizer step: all its micro-batches), after the first steps
(warm-up) are dropped. Checkpoint size is the last checkpoint folder's files.

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
    ("full + accumulation 4", ["--gradient-accumulation", "4"]),
    ("full + adamw8bit", ["--optimizer", "adamw8bit"]),
    ("lora", ["--mode", "lora"]),
    ("lora + checkpointing", ["--mode", "lora", "--gradient-checkpointing"]),
    ("lora + accumulation 4", ["--mode", "lora", "--gradient-accumulation", "4"]),
    ("lora + adamw8bit", ["--mode", "lora", "--optimizer", "adamw8bit"]),
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
    saved = root / "dreambooth" / name / "checkpoints" / f"step-{args.steps:06d}"
    return {"step_ms": 1000 * statistics.median(times), "peak_rss_mb": usage.ru_maxrss / 1024,
            "checkpoint_mb": sum(f.stat().st_size for f in saved.iterdir()) / 1e6}


def has_bitsandbytes(env: dict) -> bool:
    """Whether the child processes can import bitsandbytes (the optional extra vfx[bnb])."""
    return subprocess.run([sys.executable, "-c", "import bitsandbytes"], env=env, capture_output=True).returncode == 0


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
        bnb = has_bitsandbytes(env)
        rows = [(label, run(root, f"bench-{i}", extra, instance, args, env) if bnb or "adamw8bit" not in extra else None)
                for i, (label, extra) in enumerate(CONFIGS)]
    print(f"vfx train on the tiny model, {args.resolution} px, batch 1, no prior, {args.threads} thread(s), "
          f"median of steps {args.warmup + 1}-{args.steps}")
    print("| configuration | step (ms) | peak RSS (MB) | checkpoint (MB) |")
    print("|---|---|---|---|")
    for label, row in rows:
        if row is None:
            print(f"| {label} | bitsandbytes not installed | | |")
        else:
            print(f"| {label} | {row['step_ms']:.1f} | {row['peak_rss_mb']:.0f} | {row['checkpoint_mb']:.1f} |")


if __name__ == "__main__":
    main()
