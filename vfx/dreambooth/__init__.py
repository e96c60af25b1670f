"""DreamBooth personalization: class-prior images, fine-tuning (full or LoRA), sampling, rare tokens.

Layout of a run, `dreambooth/<RUN>/` inside a project:
  class/        class-prior images made by `vfx regularize` (PNGs, manifest.json, stage.json)
  checkpoints/  step-XXXXXX/ full training state for exact resume
  weights/      inference weights: a diffusers pipeline (full) or pytorch_lora_weights.safetensors (LoRA)
  samples/      images from `vfx sample` (PNGs, grid.png, manifest.json)
  validation/   images sampled during training
  metrics.jsonl training metrics, one JSON object per line
"""
