"""Speed-up of a sharded `vfx invert` run as 2 concurrent processes over 1 process, on this machine.

Each configuration runs `python -m vfx invert` on a fresh copy of the same encoded project, every
process with OMP_NUM_THREADS=1 (one core each: sharding is the parallelism being measured, and
thread pools of concurrent processes would fight over the cores). Wall time includes process
start and model loading, as a job array's tasks pay them; "stage s" is the stage record's time
(first shard's start to completion), without the interpreter start. Tiny model, 64 px, CPU.

    python bench/bench_shards.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, make_project, settings, table  # noqa: E402

FRAMES, CHUNK, STEPS, SAVE = 64, 8, 40, 10
REPEATS = 2


def encoded_project() -> Path:
    from vfx.stages.encode import encode

    root = make_project(FRAMES, chunk=CHUNK)
    encode(settings(root), 8)
    return root


def fresh_copy(root: Path, name: str) -> Path:
    target = root.parent / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(root, target, ignore=shutil.ignore_patterns("inversion"))
    return target


def run_sharded(root: Path, processes: int) -> tuple[float, float]:
    """(wall seconds, stage-record seconds) for `processes` concurrent shards of `vfx invert`."""
    env = dict(os.environ, PYTHONPATH=str(REPO), VFX_QUIET="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "-m", "vfx", "invert", str(root), "--steps", str(STEPS), "--save-steps", str(SAVE),
               "--no-reconstruction"]
    began = time.perf_counter()
    procs = [subprocess.Popen(command + ["--shard", f"{k}/{processes}"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
             for k in range(processes)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"invert shard failed:\n{err.decode()[-2000:]}")
    wall = time.perf_counter() - began
    record = json.loads((root / "inversion" / "stage.json").read_text())
    shutil.rmtree(root)
    return wall, record["seconds"]


def main() -> None:
    os.environ["VFX_QUIET"] = "1"
    base = encoded_project()
    best = {}
    for processes in (1, 2):
        best[processes] = min(run_sharded(fresh_copy(base, f"run{processes}-{r}"), processes) for r in range(REPEATS))
    shutil.rmtree(base.parent)
    rows = [[n, best[n][0], best[1][0] / best[n][0], best[n][1], best[1][1] / best[n][1]] for n in (1, 2)]
    print(table(f"invert, {FRAMES} frames in chunks of {CHUNK}, {STEPS} steps, tiny model, 64 px, CPU "
                f"({os.cpu_count()} cores); OMP_NUM_THREADS=1 per process; best of {REPEATS}",
                ["processes", "wall s", "speed-up (wall)", "stage s", "speed-up (stage)"], rows))


if __name__ == "__main__":
    main()
