"""Training checkpoints: the full state for an exact resume, as safetensors + JSON (nothing pickled).

checkpoints/step-XXXXXX/
  state.json               step, base model identity, training options, data order, LR scheduler,
                           gradient scaler, optimizer hyper-parameters, number of processes
  trainable.safetensors    the trained parameters ("unet.<name>", "text_encoder.<name>", "text_encoder_2.<name>")
  optimizer.safetensors    the optimizer's per-parameter tensors ("<index>.<name>", e.g. "3.exp_avg", or
                           "3.__bnb_optimizer_quant_state__.state1" for 8-bit AdamW's quantised moments)
  rng-<rank>.safetensors   per process: torch CPU/CUDA RNG, the training generator, numpy's MT state
  rng-<rank>.json          per process: Python's `random` state, numpy's scalar state

A checkpoint is written into a hidden `.step-XXXXXX.partial/` folder and renamed when complete, so a
folder named `step-XXXXXX` is always whole.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vfx.errors import BadInput
from vfx.fsutil import atomic_write_json, read_json, replace_path

STATE = "state.json"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and (entry / STATE).is_file():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def find_checkpoint(root: Path, spec: str) -> Path:
    """`latest` (the newest under `root`) or a path to a checkpoint folder."""
    if spec == "latest":
        found = list_checkpoints(root)
        if not found:
            raise BadInput(f"--resume latest: no checkpoint in {root} to resume from; train without --resume first")
        return found[-1][1]
    path = Path(spec).expanduser()
    if not (path / STATE).is_file():
        raise BadInput(f"--resume {spec}: not a training checkpoint (no {STATE}); pass 'latest' or a step-XXXXXX folder")
    return path


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; remove older ones and leftovers of interrupted saves."""
    for _, path in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for leftover in Path(root).glob(".step-*.partial"):
        shutil.rmtree(leftover, ignore_errors=True)


# ---------------------------------------------------------------- RNG


def rng_state(generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random number generator training touches: tensors, and JSON-able values."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{index}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    if generator is not None:
        tensors["generator"] = generator.get_state()
    version, internal, gauss = random.getstate()
    values = {"python": [version, list(internal), gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return tensors, values


def set_rng_state(tensors: dict[str, torch.Tensor], values: dict[str, Any], generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().view(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))
    if generator is not None:
        generator.set_state(tensors["generator"])


# ---------------------------------------------------------------- optimizer


def optimizer_to_files(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict as named tensors ("<index>.<name>", nested dicts joined with ".") and JSON."""
    tensors, scalars, stored = {}, {}, set()
    for index, values in state["state"].items():
        for key, value in _flatten(values, str(index)):
            if not torch.is_tensor(value):
                scalars[key] = value
                continue
            value = value.detach().cpu().contiguous()
            storage = value.untyped_storage().data_ptr()
            # safetensors refuses shared memory; bitsandbytes shares one quantisation map between parameters.
            tensors[key] = value.clone() if storage in stored else value
            stored.add(storage)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()} for group in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, *path = key.split(".")
        node = state.setdefault(int(index), {})
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in group.items()} for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _flatten(values: dict, prefix: str):
    """(dotted key, leaf) pairs of a nested dict, e.g. bitsandbytes' "__bnb_optimizer_quant_state__"."""
    for name, value in values.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}.{name}")
        else:
            yield f"{prefix}.{name}", value


# ---------------------------------------------------------------- save / load


def save(
    root: Path,
    step: int,
    *,
    rank: int,
    is_main: bool,
    trainable: dict[str, torch.Tensor],
    optimizer,
    lr_scheduler,
    scaler,
    generator: torch.Generator,
    meta: dict,
) -> Path:
    """Write this process's share of checkpoint `step` into the partial folder (see `publish`)."""
    partial = Path(root) / f".{step_dir(root, step).name}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    tensors, values = rng_state(generator)
    save_file(tensors, str(partial / f"rng-{rank}.safetensors"))
    atomic_write_json(partial / f"rng-{rank}.json", values)
    if is_main:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(partial / TRAINABLE))
        opt_tensors, opt_meta = optimizer_to_files(optimizer.state_dict())
        save_file(opt_tensors, str(partial / OPTIMIZER))
        state = dict(meta, step=step, optimizer=opt_meta, lr_scheduler=lr_scheduler.state_dict(),
                     scaler=scaler.state_dict() if scaler is not None else None)
        # state.json last: it marks the checkpoint complete.
        atomic_write_json(partial / STATE, state)
    return partial


def publish(root: Path, step: int) -> Path:
    """Rename the partial folder into place (main process, after every process saved its share)."""
    final = step_dir(root, step)
    replace_path(Path(root) / f".{final.name}.partial", final)
    return final


def read_state(folder: Path) -> dict:
    state = read_json(Path(folder) / STATE)
    if not state:
        raise BadInput(f"{folder} is not a readable training checkpoint (missing or damaged {STATE})")
    return state


def load(
    folder: Path,
    *,
    rank: int,
    parameters: dict[str, torch.nn.Parameter],
    optimizer,
    lr_scheduler,
    scaler,
    generator: torch.Generator,
) -> dict:
    """Restore everything `save` wrote into the live objects; returns state.json."""
    folder = Path(folder)
    state = read_state(folder)
    try:
        weights = load_file(str(folder / TRAINABLE))
        opt_tensors = load_file(str(folder / OPTIMIZER))
        rng_tensors = load_file(str(folder / f"rng-{rank}.safetensors"))
        rng_values = json.loads((folder / f"rng-{rank}.json").read_text())
    except (OSError, ValueError, SafetensorError) as exc:
        raise BadInput(f"{folder} is not a readable training checkpoint: {exc}") from None
    if set(weights) != set(parameters):
        missing = sorted(set(parameters) - set(weights))[:3]
        raise BadInput(f"{folder} does not hold the parameters this training needs (e.g. {missing}); "
                       "it was made with other --mode/--rank/--train-text-encoder options")
    with torch.no_grad():
        for name, param in parameters.items():
            param.copy_(weights[name].to(param.device, param.dtype))
    optimizer.load_state_dict(optimizer_from_files(opt_tensors, state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(rng_tensors, rng_values, generator)
    return state
