"""Device and dtype resolution: fp32 on CPU, fp16 on CUDA unless asked."""

from __future__ import annotations

import torch

from vfx.errors import BadInput

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(spec: str | None) -> torch.device:
    spec = (spec or "auto").lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec not in {"cpu", "cuda", "mps"} and not spec.startswith("cuda:"):
        raise BadInput(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput("--device cuda was asked for, but no CUDA device is available")
    if spec == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BadInput("--device mps was asked for, but MPS is not available")
    return torch.device(spec)


def resolve_dtype(spec: str | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU by default, fp16 on accelerators."""
    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if spec not in DTYPES:
        raise BadInput(f"unknown dtype {spec!r}: use auto, fp32, fp16 or bf16")
    return DTYPES[spec]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]
