"""One TokenFlow step with the first frames to propagate in the keyframes' UNet call (the editor's
plan) against the keyframes alone in theirs (the plan before), for a few frame counts.

One process, the two plans alternating step by step so both see the same machine; the step's latents
in memory (no Zarr), the median of REPEATS steps after WARMUP pairs. Tiny model, 64 px, window 8,
the default frame batch, CPU, one thread.

    python bench/bench_keyframe_call.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

REPEATS, WARMUP, WINDOW = 20, 4, 8
COUNTS = (16, 64)


def main() -> None:
    import numpy as np
    import torch

    from vfx.diffusion.ddim import Schedule
    from vfx.diffusion.text import encode_prompt
    from vfx.diffusion.tokenflow import Embeddings, StepIO, TokenFlowEditor, draw_keyframes
    from vfx.models import load_pipeline, resolve_model
    from vfx.stages.edit_config import EditConfig

    class KeyframesAlone(TokenFlowEditor):
        """The plan before: no frame joins the keyframes' call."""

        def _propagation_plan(self, frames, keyframes):
            joined, batches = super()._propagation_plan(frames, keyframes)
            todo = joined + [frame for batch in batches for frame in batch]
            return [], [todo[i : i + self.frame_batch] for i in range(0, len(todo), self.frame_batch)]

    torch.set_num_threads(1)
    pipe = load_pipeline(resolve_model("tiny"), torch.device("cpu"), torch.float32)
    schedule = Schedule.from_pipeline(pipe)
    embeddings = Embeddings(encode_prompt(pipe, ""), encode_prompt(pipe, ""), encode_prompt(pipe, "a red robot"))
    rows = []
    for frames in COUNTS:
        latents = np.random.default_rng(0).standard_normal((frames, 4, 8, 8)).astype(np.float32)
        out = np.zeros_like(latents)
        io = StepIO(lambda s, e: latents[s:e], lambda idx: latents[idx], lambda s, e: latents[s:e],
                    lambda idx: latents[idx], lambda s, e, a: out.__setitem__(slice(s, e), a))
        keyframes = draw_keyframes(frames, WINDOW, seed=0, step=0)
        editors = {kind: cls(pipe.unet, schedule, embeddings, 7.5, "distance", WINDOW, torch.device("cpu"),
                             EditConfig.frame_batch)
                   for kind, cls in (("alone", KeyframesAlone), ("joined", TokenFlowEditor))}
        times, calls = {kind: [] for kind in editors}, {}
        for i in range(WARMUP + REPEATS):
            for kind, editor in editors.items():
                counted = []
                hook = pipe.unet.register_forward_pre_hook(lambda module, args: counted.append(1))
                start = time.perf_counter()
                editor.step(io, frames, 8, keyframes, 501, 401, inject_attention=True, inject_conv=True)
                elapsed = time.perf_counter() - start
                hook.remove()
                calls[kind] = len(counted)
                if i >= WARMUP:
                    times[kind].append(elapsed)
        alone, joined = (statistics.median(times[kind]) * 1e3 for kind in ("alone", "joined"))
        rows.append([frames, len(keyframes), f"{calls['alone']} -> {calls['joined']}", alone, joined, joined / alone])
    print(table(f"TokenFlow step, tiny model, 64 px, CPU (1 thread), median of {REPEATS}",
                ["frames", "keyframes", "UNet calls / step", "keyframes alone ms", "joined ms", "ratio"], rows))


if __name__ == "__main__":
    main()
