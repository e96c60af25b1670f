"""Edit time and peak RSS per method on the embedded tiny model: pnp, sdedit, pnp + canny ControlNet,
pnp + flow correspondences, at 64 frames of 64 px by default.

One project is prepared once (extract, encode, invert, flow); each edit then runs in its own process,
so its peak RSS is its own (os.wait4 reports the child's maximum resident set). "wall" is the whole
command (interpreter, model load, control maps); "loop" is the edit loop as the stage reports it.

    python bench/bench_edit_methods.py [--frames 64] [--size 64] [--steps 5] [--threads 1]

One torch thread by default: on a shared, busy CPU, OpenMP threads spinning for each other distort
timings badly. The tiny model makes the UNet cheap, so the table shows the loop's own overheads
(ControlNet calls, flow composition) far larger, relative to the UNet, than a real model would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = [  # (label, edit name, options)
    ("pnp", "pnp", []),
    ("sdedit (start 0.9)", "sdedit", ["--method", "sdedit", "--start", "0.9"]),
    ("pnp + canny", "canny", ["--control", "canny"]),
    ("pnp + flow corr.", "flow", ["--correspondence", "flow"]),
]


def vfx(env: dict, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "vfx", "--quiet", *map(str, args)], env=env, check=True,
                   stdout=subprocess.DEVNULL)


def prepare(root: Path, args, env: dict) -> None:
    from vfx.media import synthetic_video

    video = synthetic_video(root.parent / "clip.mp4", frames=args.frames, size=args.size, fps=12)
    vfx(env, "init", root, "--video", video, "--size", f"{args.size}x{args.size}", "--max-frames", args.frames,
        "--chunk-frames", 8, "--device", "cpu")
    vfx(env, "extract", root)
    vfx(env, "encode", root)
    vfx(env, "invert", root, "--steps", args.steps, "--save-steps", args.steps, "--no-reconstruction")
    vfx(env, "flow", root)


def run(root: Path, name: str, extra: list[str], args, env: dict) -> dict:
    command = [sys.executable, "-m", "vfx", "--quiet", "edit", str(root), "--prompt", "a red robot", "--name", name,
               "--steps", str(args.steps), "--json", "--force", *extra]
    began = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        wall = time.perf_counter() - began
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{err.read()}")
        return {**json.loads(out.read()), "wall": wall, "rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for every process")
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    with tempfile.TemporaryDirectory(prefix="vfx-bench-edit-") as scratch:
        root = Path(scratch) / "project"
        prepare(root, args, env)
        print(f"# tiny model, {args.frames} frames of {args.size}x{args.size}, {args.steps}-step schedule, "
              f"{args.threads} thread(s), {os.cpu_count()} CPUs")
        print(f"{'method':<20} {'steps':>5} {'wall s':>7} {'loop s':>7} {'s/step':>7} {'UNet fe':>8} {'CN fe':>6} {'peak RSS MB':>12}")
        for label, name, extra in METHODS:
            result = run(root, name, extra, args, env)
            steps = result["computed_steps"]
            print(f"{label:<20} {steps:>5} {result['wall']:>7.1f} {result['seconds']:>7.1f} "
                  f"{result['seconds'] / steps:>7.2f} {result['unet_frame_evaluations']:>8} "
                  f"{result['controlnet_frame_evaluations']:>6} {result['rss_mb']:>12.0f}", flush=True)


if __name__ == "__main__":
    main()
