"""Run by the older stack's Python (no vfx installed there): load exported weights with diffusers'
own loaders and write the image vfx's sampler makes for the same prompt, seed and settings.

usage: generate.py JOBS.json   (a list of {"kind", "path", "base", "prompt", "steps", "size", "out"})
kind: lora (a LoRA file on top of base), folder (a pipeline folder), checkpoint (one LDM file + base configs)
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline


def load(job):
    if job["kind"] == "folder":
        return StableDiffusionPipeline.from_pretrained(job["path"], local_files_only=True, safety_checker=None)
    if job["kind"] == "checkpoint":
        return StableDiffusionPipeline.from_single_file(job["path"], config=job["base"], local_files_only=True,
                                                        safety_checker=None, requires_safety_checker=False)
    pipe = StableDiffusionPipeline.from_pretrained(job["base"], local_files_only=True, safety_checker=None)
    path = Path(job["path"])
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    return pipe


def main():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for job in json.loads(Path(sys.argv[1]).read_text()):
        pipe = load(job)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(prompt=[job["prompt"]], negative_prompt=[""], num_inference_steps=job["steps"],
                      guidance_scale=7.5, width=job["size"], height=job["size"],
                      generator=[torch.Generator("cpu").manual_seed(0)], output_type="np").images
        np.save(job["out"], (np.clip(images[0], 0, 1) * 255).round().astype(np.uint8))
        print(job["kind"], "loaded: adapters", getattr(pipe, "get_list_adapters", dict)())


if __name__ == "__main__":
    main()
