"""Checkpoints as safetensors + JSON, written atomically; nothing is unpickled.

Layout in a run folder:
    checkpoint-{step}.safetensors   model weights ("model.*"; a tensor shared by several modules is stored once and
                                    its other names listed as aliases in the JSON), optimizer moments ("optim.{i}.*"),
                                    RNG state ("rng.*")
    checkpoint.json                 step, optimizer param groups, python RNG state, extra run state, and the name of
                                    the safetensors file; written last, so it always names a complete file.
Each file is written to a temporary name in the same folder and renamed into place. Loading fails loudly on any
missing or unexpected key.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from routelab._atomic import atomic_write_bytes, atomic_write_text

CHECKPOINT_JSON = "checkpoint.json"


def save_checkpoint(
    folder: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    extra: dict[str, Any],
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write model, optimizer and RNG states for `step` into `folder`; returns the safetensors file.

    `model_state` / `optimizer_state` replace `model.state_dict()` / `optimizer.state_dict()` (an expert-parallel
    run passes the consolidated ones, so the checkpoint is what one process would write)."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}  # state-dict key -> key holding the same tensor (parameters shared across layers)
    seen: dict[tuple, str] = {}
    for key, value in (model_state if model_state is not None else model.state_dict()).items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()))
        if value.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[f"model.{key}"] = value.detach().clone().contiguous()
    opt = optimizer_state if optimizer_state is not None else optimizer.state_dict()
    for index, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).detach().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    name = f"checkpoint-{step}.safetensors"
    atomic_write_bytes(folder / name, save(tensors))
    meta = {
        "format": 1,
        "step": step,
        "weights": name,
        "param_groups": opt["param_groups"],
        "aliases": aliases,
        "python_rng": _jsonable(random.getstate()),
        "extra": extra,
    }
    atomic_write_text(folder / CHECKPOINT_JSON, json.dumps(meta, indent=1))
    for old in folder.glob("checkpoint-*.safetensors"):  # keep only the checkpoint the JSON names
        if old.name != name:
            old.unlink(missing_ok=True)
    return folder / name


def has_checkpoint(folder: Path) -> bool:
    return (Path(folder) / CHECKPOINT_JSON).is_file()


def load_checkpoint(folder: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG states in place; returns the JSON metadata (step, extra)."""
    folder = Path(folder)
    meta = json.loads((folder / CHECKPOINT_JSON).read_text())
    tensors = load_file(str(folder / meta["weights"]))
    model_sd: dict[str, torch.Tensor] = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    for key, source in meta.get("aliases", {}).items():
        model_sd[key] = model_sd[source]
    missing = sorted(set(model.state_dict()) - set(model_sd))
    unexpected = sorted(set(model_sd) - set(model.state_dict()))
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not match the model: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(model_sd, strict=True)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    random.setstate(_tuples(meta["python_rng"]))
    return meta


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
