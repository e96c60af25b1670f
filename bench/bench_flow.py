"""Flow throughput: frame pairs per second at 128, 256 and 512 px for each DIS preset.

A "pair" is what `vfx flow` computes per frame pair: forward and backward DIS flow plus both
occlusion masks. The DIS column is one flow field alone, for comparison. Frames are a smooth
random texture panned by (1.5, 0.7) px. Each cell runs for about a second (at least 2 pairs).

    python bench/bench_flow.py [--seconds 1.0] [--sizes 128 256 512]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import cv2
import numpy as np

from vfx import opticalflow as F


def texture(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.random((size // 8, size // 8, 3)).astype(np.float32)
    return (cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1) * 255).astype(np.uint8)


def frames(size: int) -> tuple[np.ndarray, np.ndarray]:
    big = texture(size + 32)
    shifted = cv2.warpAffine(big, np.float32([[1, 0, 1.5], [0, 1, 0.7]]), big.shape[1::-1], flags=cv2.INTER_CUBIC)
    return big[16 : 16 + size, 16 : 16 + size], shifted[16 : 16 + size, 16 : 16 + size]


def rate(work, seconds: float) -> float:
    """Calls per second of `work`, run for about `seconds` (after one warm-up call)."""
    work()
    count, began = 0, time.perf_counter()
    while count < 2 or time.perf_counter() - began < seconds:
        work()
        count += 1
    return count / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per cell")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    args = parser.parse_args()
    print(f"# OpenCV {cv2.__version__}, {cv2.getNumThreads()} threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(f"{'size':>6} {'preset':>10} {'pairs/s':>9} {'DIS flows/s':>12}")
    for size in args.sizes:
        a, b = frames(size)
        for preset in ("ultrafast", "fast", "medium"):
            pairs = rate(lambda: F.flow_pair(a, b, preset), args.seconds)
            flows = rate(lambda: F.dis_flow(a, b, preset), args.seconds)
            print(f"{size:>6} {preset:>10} {pairs:>9.1f} {flows:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
