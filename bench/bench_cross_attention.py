"""UNet call time with diffusers' per-frame cross-attention against vfx's shared-text processor
(each run of frames reading one prompt projects its text once and attends as one query sequence).

One process, the two processor sets alternating call by call so both see the same machine; the median
of REPEATS calls per row. Rows: an inversion call (one prompt) and edit calls (3 branches).

    python bench/bench_cross_attention.py [--model tiny]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

REPEATS, WARMUP = 15, 3
CALLS = [("inversion", 1, 8), ("edit", 3, 8), ("edit", 3, 16)]  # kind, prompts, frames per prompt


def main() -> None:
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from vfx.diffusion.cross_attention import shared_text_processors
    from vfx.models import load_pipeline, resolve_model

    model = sys.argv[sys.argv.index("--model") + 1] if "--model" in sys.argv else "tiny"
    torch.set_num_threads(1)
    unet = load_pipeline(resolve_model(model), torch.device("cpu"), torch.float32).unet
    plain = {name: AttnProcessor2_0() for name in unet.attn_processors}
    rows = []
    for kind, prompts, frames in CALLS:
        shared = {**plain, **shared_text_processors(unet, lambda prompts=prompts: prompts)}
        x = torch.randn(prompts * frames, unet.config.in_channels, 8, 8)
        text = torch.randn(prompts, 77, unet.config.cross_attention_dim).repeat_interleave(frames, dim=0)
        times = {"plain": [], "shared": []}
        with torch.no_grad():
            for i in range(WARMUP + REPEATS):
                for name, processors in (("plain", plain), ("shared", shared)):
                    unet.set_attn_processor(dict(processors))
                    start = time.perf_counter()
                    unet(x, 401, encoder_hidden_states=text)
                    if i >= WARMUP:
                        times[name].append(time.perf_counter() - start)
        a, b = (statistics.median(times[name]) * 1e3 for name in ("plain", "shared"))
        rows.append([kind, prompts * frames, a, b, b / a])
    print(table(f"UNet call, {model} model, 64 px, CPU (1 thread), median of {REPEATS}",
                ["call", "rows", "per-frame ms", "shared-text ms", "ratio"], rows))


if __name__ == "__main__":
    main()
