"""DDIM inversion throughput and its overhead over bare UNet calls; peak RSS for 16 vs 128 frames.

overhead = stage time / (UNet frame-evaluations x time of one bare frame-evaluation at the same
batch size, measured in the same process). Tiny model, 64 px, CPU.

    python bench/bench_invert.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import in_child, make_project, peak_rss_mb, settings, table, timed, unet_seconds_per_frame, entry  # noqa: E402

COUNTS = (16, 128)
STEPS, BATCH = 20, 8


def worker(config: dict) -> dict:
    from vfx.stages.encode import encode
    from vfx.stages.invert import invert

    frames = config["frames"]
    root = make_project(frames)
    s = settings(root)
    encode(s, 8)
    per_frame = unet_seconds_per_frame(s.pipeline(), BATCH, 64)
    seconds, _ = timed(invert, s, STEPS, 10, "", BATCH, False)
    evaluations = frames * STEPS
    return {"frame_steps_per_s": evaluations / seconds, "overhead": seconds / (evaluations * per_frame),
            "rss_mb": peak_rss_mb()}


def main() -> None:
    results = {n: in_child(__file__, {"frames": n}) for n in COUNTS}
    rows = [[n, r["frame_steps_per_s"], r["overhead"], r["rss_mb"]] for n, r in results.items()]
    print(table(f"invert ({STEPS} steps, no reconstruction), tiny model, 64 px, CPU",
                ["frames", "frame-steps/s", "time / bare UNet", "peak RSS MB"], rows))
    ratio = results[COUNTS[-1]]["rss_mb"] / results[COUNTS[0]]["rss_mb"]
    print(f"\npeak RSS {COUNTS[-1]} / {COUNTS[0]} frames: {ratio:.2f}")


if __name__ == "__main__":
    entry(worker, main)
