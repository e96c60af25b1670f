"""Model files in the layout every maintained stack reads: transformers 4.x and 5.x, diffusers >= 0.30.

transformers 5 saves a CLIP text encoder's weights without the `text_model.` prefix that its 4.x
releases expect (4.x then fails, or silently starts from random weights), and a tokenizer as
tokenizer.json alone, where 4.x's CLIPTokenizer reads vocab.json and merges.txt. Both majors read
the 4.x layout, so vfx writes that one.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

TEXT_PREFIX = "text_model."
# Text encoders whose 4.x layout puts every weight under `text_model.` (the projection model keeps
# `text_projection.` beside it, and transformers 5 already saves it that way).
PREFIXED_ARCHITECTURES = {"CLIPTextModel"}


def text_encoder_keys(keys, architecture: str = "CLIPTextModel") -> dict[str, str]:
    """old -> new names of a text encoder's weights (or of its LoRA layers) in the 4.x layout."""
    keys = list(keys)
    if architecture not in PREFIXED_ARCHITECTURES or any(k.startswith(TEXT_PREFIX) for k in keys):
        return {k: k for k in keys}
    return {k: TEXT_PREFIX + k for k in keys}


def portable_text_encoder(folder: Path) -> None:
    """Rename the weights of a saved text encoder folder (single file or shards) to the 4.x layout."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    architecture = (config.get("architectures") or ["CLIPTextModel"])[0]
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    for name in files:
        tensors = load_file(str(folder / name))
        renamed = text_encoder_keys(tensors, architecture)
        if any(old != new for old, new in renamed.items()):
            save_file({renamed[k]: v for k, v in tensors.items()}, str(folder / name), metadata={"format": "pt"})
    if index:
        renamed = text_encoder_keys(index["weight_map"], architecture)
        index["weight_map"] = {renamed[k]: v for k, v in index["weight_map"].items()}
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True))


def portable_tokenizer(folder: Path) -> None:
    """Add vocab.json and merges.txt (what 4.x's CLIPTokenizer reads) from a BPE tokenizer.json."""
    folder = Path(folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    if model.get("type") != "BPE":
        return
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def portable_pipeline(folder: Path) -> None:
    """Every text encoder and tokenizer of a saved diffusers pipeline folder in the 4.x layout."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    for component, entry in index.items():
        if not isinstance(entry, list) or not (folder / component).is_dir():
            continue
        if entry[1].startswith("CLIPTextModel"):
            portable_text_encoder(folder / component)
        elif entry[1].startswith("CLIPTokenizer") and (folder / component / "tokenizer.json").is_file():
            portable_tokenizer(folder / component)
