"""Encode and decode throughput, and peak RSS for 32 vs 512 frames at 64 px (tiny model, CPU).

Memory must not grow with the frame count: both stages stream chunk by chunk.

    python bench/bench_stages.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import in_child, make_project, peak_rss_mb, settings, table, timed, entry  # noqa: E402

COUNTS = (32, 512)


def worker(config: dict) -> dict:
    from vfx.stages.decode import decode
    from vfx.stages.encode import encode

    root = make_project(config["frames"])
    s = settings(root)
    s.pipeline()  # load outside the timings
    encode_s, _ = timed(encode, s, 8)
    decode_s, _ = timed(decode, s, None, 8)
    return {"encode_fps": config["frames"] / encode_s, "decode_fps": config["frames"] / decode_s, "rss_mb": peak_rss_mb()}


def main() -> None:
    results = {n: in_child(__file__, {"frames": n}) for n in COUNTS}
    rows = [[n, r["encode_fps"], r["decode_fps"], r["rss_mb"]] for n, r in results.items()]
    print(table("encode / decode, tiny model, 64 px, CPU", ["frames", "encode frames/s", "decode frames/s", "peak RSS MB"], rows))
    ratio = results[COUNTS[-1]]["rss_mb"] / results[COUNTS[0]]["rss_mb"]
    print(f"\npeak RSS {COUNTS[-1]} / {COUNTS[0]} frames: {ratio:.2f} (bound 1.3)")


if __name__ == "__main__":
    entry(worker, main)
