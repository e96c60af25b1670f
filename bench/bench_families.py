"""The edit on each embedded model family at the same latent size (64 px frames, 8×8 latents): UNet
frame-evaluations per step, time per step, time over bare UNet evaluations (as in bench_edit.py), and
peak RSS; tiny-xl also at 64 frames, whose peak RSS must stay near its 16-frame figure.

    python bench/bench_families.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_edit import STEPS  # noqa: E402
from common import in_child, table  # noqa: E402

RUNS = (("tiny", 16), ("tiny-v", 16), ("tiny-xl", 16), ("tiny-xl", 64))


def main() -> None:
    script = str(Path(__file__).resolve().parent / "bench_edit.py")
    rows = []
    for model, frames in RUNS:
        r = in_child(script, {"frames": frames, "method": "tokenflow", "model": model})
        rows.append([model, frames, 3 * frames, r["seconds"] / STEPS, r["overhead"], r["rss_mb"]])
    print(table(f"edit ({STEPS} steps) by model family, 64 px, CPU",
                ["model", "frames", "UNet frame-evals / step", "seconds / step", "time / bare UNet", "peak RSS MB"],
                rows))


if __name__ == "__main__":
    main()
