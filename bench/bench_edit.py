"""TokenFlow edit: time, peak RSS and overhead over bare UNet evaluations, for 16, 64 and 256 frames,
against a naive per-frame PnP edit (every frame through the UNet with PnP injection, no keyframes,
no propagation) as a baseline.

overhead = edit time / (UNet frame-evaluations the method needs x time of one bare frame-evaluation
at the same batch size, measured in the same process); "in UNet calls" is the part of the edit's time
spent inside the UNet's calls (its attention processors and hooks included), over the same bare time.
TokenFlow needs 3N frame-evaluations per step (keyframes once, every other frame once); so does the
baseline. Tiny model, 64 px, CPU.

    python bench/bench_edit.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import in_child, make_project, peak_rss_mb, settings, table, timed, unet_seconds_per_frame, entry  # noqa: E402

COUNTS = (16, 64, 256)
STEPS = 4


def frame_batch() -> int:
    """The edit's default propagation batch: both methods run UNet calls of its size."""
    from vfx.stages.edit_config import EditConfig

    return EditConfig.frame_batch


def naive_pnp(s, prompt: str) -> int:
    """Per-frame PnP over the same inverted latents: returns UNet frame-evaluations."""
    import numpy as np
    import torch

    from vfx.diffusion.ddim import Schedule
    from vfx.diffusion.text import encode_prompt
    from vfx.diffusion.tokenflow import Embeddings, TokenFlowEditor
    from vfx.store import chunk_ranges, open_array

    pipe = s.pipeline()
    schedule = Schedule.from_pipeline(pipe)
    trajectory = open_array(s.folder("inversion", "trajectory.zarr"))
    saved = list(trajectory.attrs["timesteps"])
    timesteps = schedule.timesteps(STEPS)
    frames = trajectory.shape[1]
    embeddings = Embeddings(encode_prompt(pipe, ""), encode_prompt(pipe, ""), encode_prompt(pipe, prompt))
    batch = frame_batch()
    editor = TokenFlowEditor(pipe.unet, schedule, embeddings, 7.5, "distance", 8, s.device, batch)
    latents = np.asarray(trajectory[saved.index(timesteps[0])])
    with editor.hooked(), torch.no_grad():  # the per-frame processors go on once, for every call
        for i, t in enumerate(timesteps):
            prev = timesteps[i + 1] if i + 1 < STEPS else None
            for start, end in chunk_ranges(frames, batch):
                x = torch.from_numpy(latents[start:end])
                source = torch.from_numpy(np.asarray(trajectory[saved.index(t), start:end]))
                guided = editor.plain_call(source, x, t, inject_attention=True, inject_conv=True)
                latents[start:end] = schedule.denoise_step(guided, x, t, prev).numpy()
    return editor.unet_frames


def worker(config: dict) -> dict:
    from vfx.stages.edit import edit
    from vfx.stages.edit_config import EditConfig
    from vfx.stages.encode import encode
    from vfx.stages.invert import invert

    frames = config["frames"]
    s = settings(make_project(frames, model=config.get("model", "tiny")))
    encode(s, 8)
    invert(s, STEPS, STEPS, "", 8, False)
    pipe = s.pipeline()
    per_frame = unet_seconds_per_frame(pipe, 3 * frame_batch(), 64)
    in_unet = time_in_calls(pipe.unet)
    if config["method"] == "naive":
        seconds, evaluations = timed(naive_pnp, s, "a red robot")
    else:
        seconds, result = timed(edit, s, EditConfig("a red robot", "bench", steps=STEPS))
        evaluations = result["unet_frame_evaluations"]
    assert evaluations == 3 * frames * STEPS
    bare = evaluations * per_frame
    return {"seconds": seconds, "overhead": seconds / bare, "in_unet": in_unet[0] / bare, "rss_mb": peak_rss_mb()}


def time_in_calls(module) -> list[float]:
    """[seconds spent inside `module`'s forward so far], kept up to date by hooks."""
    spent, began = [0.0], [0.0]
    module.register_forward_pre_hook(lambda *_: began.__setitem__(0, time.perf_counter()))
    module.register_forward_hook(lambda *_: spent.__setitem__(0, spent[0] + time.perf_counter() - began[0]))
    return spent


def main() -> None:
    rows, rss = [], {}
    for method in ("tokenflow", "naive"):
        for n in COUNTS:
            r = in_child(__file__, {"frames": n, "method": method})
            rss[(method, n)] = r["rss_mb"]
            rows.append([method, n, r["seconds"], r["overhead"], r["in_unet"], r["rss_mb"]])
    print(table(f"edit ({STEPS} steps), tiny model, 64 px, CPU",
                ["method", "frames", "seconds", "time / bare UNet", "in UNet calls / bare", "peak RSS MB"], rows))
    ratio = rss[("tokenflow", COUNTS[-1])] / rss[("tokenflow", COUNTS[0])]
    print(f"\ntokenflow peak RSS {COUNTS[-1]} / {COUNTS[0]} frames: {ratio:.2f} (bound 1.5)")


if __name__ == "__main__":
    entry(worker, main)
