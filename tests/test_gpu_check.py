"""bench/gpu_check.sh, the check a session runs when it is lent a GPU, run through on the CPU (its dry
run: the same parts on the tiny models), so that it still works when the GPU comes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_the_gpu_check_runs_every_part_and_prints_its_table(tmp_path):
    work = tmp_path / "work"
    env = {**os.environ, "GPU_CHECK_DRY": "1", "GPU_CHECK_PYTHON": sys.executable, "GPU_CHECK_WORK": str(work),
           "GPU_CHECK_VENV": str(tmp_path / "venv")}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = {path.name: path.read_text().strip() for path in (work / "status").iterdir()}
    built = {"model", "model-xl"}  # the dry run takes the embedded tiny models instead
    assert all(statuses[name].startswith("skipped: dry run") for name in built), statuses
    assert all(status.startswith("ok") for name, status in statuses.items() if name not in built), statuses
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    header, rows = [cell.strip() for cell in rows[0]], rows[1:]
    assert len(rows) == len(statuses)
    steps = header.index("s/step")
    timed = [row for row in rows if row[0].strip().split()[0] in {"invert", "edit", "train", "SDXL"}
             and "clip" not in row[0]]
    assert len(timed) == 8 and all(float(row[steps]) > 0 for row in timed)
