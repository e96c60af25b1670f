"""The edit at real model size on the CPU: SD 1.5's architecture (random weights, `vfx model random
--arch sd15`), 256x256 frames, 8, 16 and 32 frames, 2 edit steps.

Tables:
1. By frame count: the edit's peak RSS (its own process; it must stay flat beyond the keyframe cache,
   which grows with the keyframe count N / batch-size), seconds per step, and seconds per UNet
   frame-evaluation in the edit (3N per step: keyframes once, every other frame once) against a bare
   UNet call at batch 8 (the propagation pass's frame batch), measured in the same process.
2. Extended attention against the number of keyframes K: the first down block's self-attention of
   the SD 1.5 UNet (320 channels, 8 heads, 1024 tokens a frame at 256 px) over 3 branches of K frames,
   extended (each edit branch attends to all K keyframes at once) against per-frame attention.

Preparation (extract, encode, a 2-step fixed-point inversion) runs in its own process, outside the
timings. Writing the random model takes a minute the first time; it is kept in
$VFX_BENCH_MODELS (default /tmp/vfx-bench-models).

    python bench/bench_real_size.py            # 8, 16 and 32 frames
    python bench/bench_real_size.py 8 16       # fewer (a 32-frame edit takes about 15 minutes on 2 cores)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import entry, in_child, make_project, peak_rss_mb, settings, table, timed, unet_seconds_per_frame  # noqa: E402

COUNTS = (8, 16, 32)
SIZE, STEPS, FRAME_BATCH = 256, 2, 8
KEYFRAMES = (1, 2, 4, 8)
PROMPT = "a red robot walking on a beach"


def model_folder() -> Path:
    from vfx.random_models import write_random_model

    folder = Path(os.environ.get("VFX_BENCH_MODELS", "/tmp/vfx-bench-models")) / "sd15"
    if not (folder / "model_index.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        write_random_model("sd15", folder, "fp16", force=True)
    return folder


def prepare(config: dict) -> dict:
    from vfx.stages.encode import encode
    from vfx.stages.invert import invert

    root = make_project(config["frames"], size=SIZE, chunk=8, model=config["model"])
    s = settings(root)
    encode(s, 4)
    invert(s, save_steps=STEPS, prompt="a person walking", batch_size=8, reconstruction=False)
    return {"root": str(root)}


def edit_worker(config: dict) -> dict:
    from vfx.stages.edit import edit
    from vfx.stages.edit_config import EditConfig

    s = settings(Path(config["root"]))
    frames = config["frames"]
    bare = unet_seconds_per_frame(s.pipeline(), FRAME_BATCH, SIZE, repeats=1, warmup=1)
    seconds, _ = timed(edit, s, EditConfig(prompt=PROMPT, name="bench", steps=STEPS, frame_batch=FRAME_BATCH))
    per_eval = seconds / (3 * frames * STEPS)
    return {"rss_mb": peak_rss_mb(), "s_per_step": seconds / STEPS, "per_eval": per_eval, "bare": bare}


def attention_worker(config: dict) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from vfx.diffusion.attention import Branches, self_attention

    unet = UNet2DConditionModel.from_pretrained(config["model"], subfolder="unet", torch_dtype=torch.float32)
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    tokens = (SIZE // 8) ** 2
    rows = {}
    with torch.no_grad():
        for k in KEYFRAMES:
            hidden = torch.randn(3 * k, tokens, attn.to_q.in_features)
            times = {}
            for extended in (True, False):
                self_attention(attn, hidden, Branches(k), inject=False, extended=extended)
                began = time.perf_counter()
                for _ in range(3):
                    self_attention(attn, hidden, Branches(k), inject=False, extended=extended)
                times[extended] = (time.perf_counter() - began) / 3
            rows[k] = {"extended_ms": 1000 * times[True], "per_frame_ms": 1000 * times[False]}
    return {"rows": rows}


def worker(config: dict) -> dict:
    return {"prepare": prepare, "edit": edit_worker, "attention": attention_worker}[config["part"]](config)


def main() -> None:
    model = str(model_folder())
    counts = [int(arg) for arg in sys.argv[1:]] or list(COUNTS)
    results = {}
    for frames in counts:
        root = in_child(__file__, {"part": "prepare", "frames": frames, "model": model})["root"]
        results[frames] = in_child(__file__, {"part": "edit", "frames": frames, "root": root})
    rows = [[n, r["rss_mb"], r["s_per_step"], r["per_eval"], r["bare"], r["per_eval"] / r["bare"]]
            for n, r in results.items()]
    print(table(f"edit, SD 1.5 architecture (random weights), {SIZE}x{SIZE}, {STEPS} steps, fp32, CPU "
                f"({os.cpu_count()} cores)",
                ["frames", "peak RSS MB", "s / step", "s / UNet frame-eval (edit)", "s / bare frame-eval",
                 "edit / bare"], rows))
    attention = in_child(__file__, {"part": "attention", "model": model})["rows"]
    print()
    print(table(f"self-attention of down block 0 (320 ch, 8 heads, {(SIZE // 8) ** 2} tokens a frame), 3 branches",
                ["keyframes K", "extended (ms)", "per frame (ms)", "extended / per frame"],
                [[k, r["extended_ms"], r["per_frame_ms"], r["extended_ms"] / r["per_frame_ms"]]
                 for k, r in attention.items()]))


if __name__ == "__main__":
    entry(worker, main)
