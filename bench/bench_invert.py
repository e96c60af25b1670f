"""Inversion: the methods side by side, then throughput and peak RSS.

Methods: for each embedded model (tiny, tiny-v), DDIM at 50/200/500 steps beside fixed-point inversion
on the 50-step editing schedule (1, 2 and 3 iterations per step): UNet frame-evaluations of the
inversion, the latent round trip's RMSE against the encoded latents (denoised back over the method's
own grid: what `--reconstruction-grid full` reports), and wall time. DDIM 500 is also reconstructed
over the editing schedule (the default `--reconstruction-grid editing`), the figure that predicts the
edit. One process, one thread, the same 4 frames for every row.

Throughput: stage time over bare UNet calls for 16 and 128 frames (overhead = stage time / (UNet
frame-evaluations x time of one bare frame-evaluation at the same batch size)), 64 px, CPU.

    python bench/bench_invert.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import in_child, make_project, peak_rss_mb, settings, table, timed, unet_seconds_per_frame, entry  # noqa: E402

COUNTS = (16, 128)
STEPS, BATCH = 20, 8
EDITING = 50
METHODS = [("ddim", 50, 0), ("ddim", 200, 0), ("ddim", 500, 0), ("fixed-point", EDITING, 2),
           ("fixed-point", EDITING, 3), ("fixed-point", EDITING, 4)]


def round_trip(pipe, schedule, latents, embedding, steps: int, iterations: int, denoise_over: str) -> dict:
    """Invert `latents` over the `steps` grid, denoise back; RMSE against `latents` and UNet calls."""
    import time

    from vfx.stages.invert import denoise_latents, inversion_plan, invert_latents

    grid, saved = inversion_plan(schedule, steps, EDITING)
    began = time.perf_counter()
    states = invert_latents(pipe.unet, schedule, latents, embedding, grid, set(saved), iterations=iterations)
    seconds = time.perf_counter() - began
    back = grid[::-1] if denoise_over == "full" else schedule.timesteps(EDITING)
    clean = denoise_latents(pipe.unet, schedule, states[back[0]], embedding, back)
    rmse = float(((clean - latents) ** 2).mean() ** 0.5)
    return {"evaluations": len(grid) * max(1, iterations), "rmse": rmse, "seconds": seconds}


def methods_worker(config: dict) -> dict:
    import torch

    from vfx.diffusion.ddim import Schedule
    from vfx.diffusion.text import encode_prompt
    from vfx.stages.encode import encode
    from vfx.store import open_array

    torch.set_num_threads(1)
    root = make_project(4, model=config["model"])
    s = settings(root)
    encode(s, 4)
    pipe = s.pipeline()
    schedule = Schedule.from_pipeline(pipe)
    latents = torch.from_numpy(open_array(s.folder("latents", "latents.zarr"))[:])
    embedding = encode_prompt(pipe, "a disc moving over a gradient")
    rows = []
    with torch.no_grad():
        for method, steps, iterations in METHODS:
            rows.append({"method": method, "steps": steps, "iterations": iterations, "reconstruction": "own grid",
                         **round_trip(pipe, schedule, latents, embedding, steps, iterations, "full")})
        rows.append({"method": "ddim", "steps": 500, "iterations": 0, "reconstruction": "editing (50)",
                     **round_trip(pipe, schedule, latents, embedding, 500, 0, "editing")})
    return {"rows": rows}


def throughput_worker(config: dict) -> dict:
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


def worker(config: dict) -> dict:
    return methods_worker(config) if "model" in config else throughput_worker(config)


def main() -> None:
    for model in ("tiny", "tiny-v"):
        rows = in_child(__file__, {"model": model})["rows"]
        ddim500 = next(r for r in rows if r["steps"] == 500 and r["reconstruction"] == "own grid")
        print(table(f"inversion methods, {model}, 4 frames, 64 px, CPU (1 thread); round trip against latents/",
                    ["method", "steps", "iterations", "UNet evals / frame", "vs DDIM 500", "denoised over",
                     "latent RMSE", "inversion s"],
                    [[r["method"], r["steps"], r["iterations"], r["evaluations"],
                      f"{r['evaluations'] / ddim500['evaluations']:.2f}", r["reconstruction"], f"{r['rmse']:.2e}",
                      r["seconds"]] for r in rows]))
        print()
    results = {n: in_child(__file__, {"frames": n}) for n in COUNTS}
    rows = [[n, r["frame_steps_per_s"], r["overhead"], r["rss_mb"]] for n, r in results.items()]
    print(table(f"invert ({STEPS} steps, no reconstruction), tiny model, 64 px, CPU",
                ["frames", "frame-steps/s", "time / bare UNet", "peak RSS MB"], rows))
    ratio = results[COUNTS[-1]]["rss_mb"] / results[COUNTS[0]]["rss_mb"]
    print(f"\npeak RSS {COUNTS[-1]} / {COUNTS[0]} frames: {ratio:.2f}")


if __name__ == "__main__":
    entry(worker, main)
