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
from safetensors import safe_open
from safetensors.torch import load_file, save

from routelab._atomic import atomic_write_bytes, atomic_write_text
from routelab._checks import short_repr

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


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (unreadable, corrupt, or not for this model); the message names the file."""


def load_checkpoint(folder: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG states in place; returns the JSON metadata (step, extra).

    Everything is checked before anything is restored: the JSON, the weights file name (a plain file inside
    `folder`, not a link), the safetensors header, and every key and shape against the model and the optimizer; a
    CheckpointError naming the file leaves the model and optimizer as they were.
    """
    folder = Path(folder)
    meta_path = folder / CHECKPOINT_JSON
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {meta_path} cannot be read ({_reason(exc)})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or not isinstance(
        meta.get("param_groups"), list
    ):
        raise CheckpointError(f"checkpoint {meta_path} is not a routelab checkpoint (step, weights, param_groups)")
    name = meta.get("weights")
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or name != Path(name).name:
        raise CheckpointError(f"checkpoint {meta_path}: 'weights' must be a file name inside {folder}, "
                              f"got {short_repr(name)}")
    weights = folder / name
    if weights.is_symlink() or not weights.is_file():
        raise CheckpointError(f"checkpoint {meta_path} names {name}, which is not a regular file in {folder}")
    aliases = meta.get("aliases", {})
    if not isinstance(aliases, dict):
        raise CheckpointError(f"checkpoint {meta_path}: 'aliases' must be a mapping")
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:  # noqa: BLE001 — safetensors raises its own error types for a corrupt header
        raise CheckpointError(f"checkpoint weights {weights} are corrupt or truncated ({_reason(exc)})") from None
    _check_shapes(weights, shapes, aliases, model, optimizer)
    groups = meta["param_groups"]
    if len(groups) != len(optimizer.param_groups) or any(
        not isinstance(g, dict) or len(g.get("params", ())) != len(mine["params"])
        for g, mine in zip(groups, optimizer.param_groups)
    ):
        raise CheckpointError(f"checkpoint {meta_path}: its optimizer parameter groups do not match the model's")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"checkpoint weights {weights} are corrupt or truncated ({_reason(exc)})") from None
    model_sd: dict[str, torch.Tensor] = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    for key, source in aliases.items():
        model_sd[key] = model_sd[source]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    try:
        optimizer_state = {"state": state, "param_groups": meta["param_groups"]}
        model.load_state_dict(model_sd, strict=True)
        optimizer.load_state_dict(optimizer_state)
        torch.set_rng_state(tensors["rng.torch"])
        random.setstate(_tuples(meta["python_rng"]))
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {meta_path} does not match this run ({_reason(exc)})") from None
    return meta


def _check_shapes(weights: Path, shapes: dict[str, tuple[int, ...]], aliases: dict, model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer) -> None:
    """Every model key present with the model's shape, every optimizer moment with its parameter's shape, the RNG
    state present: checked on the header alone, before any tensor is read or copied."""
    expected = {key: tuple(v.shape) for key, v in model.state_dict().items()}
    stored = {k[len("model."):]: v for k, v in shapes.items() if k.startswith("model.")}
    for key, source in aliases.items():
        if not isinstance(key, str) or source not in stored:
            raise CheckpointError(f"checkpoint {weights}: alias {short_repr(key)} names a missing tensor")
        stored[key] = stored[source]
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {weights} does not match the model: missing {missing}, "
                              f"unexpected {unexpected}")
    wrong = [f"{k} {list(stored[k])} (model: {list(expected[k])})" for k in expected if stored[k] != expected[k]]
    if wrong:
        raise CheckpointError(f"checkpoint {weights} does not match the model's shapes: {'; '.join(wrong[:5])}"
                              + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for key, shape in shapes.items():
        if key.startswith("optim."):
            parts = key.split(".", 2)
            if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= len(params):
                raise CheckpointError(f"checkpoint {weights}: optimizer state {key} names no parameter")
            if parts[2] != "step" and shape != tuple(params[int(parts[1])].shape):
                raise CheckpointError(f"checkpoint {weights}: optimizer state {key} has shape {list(shape)}, its "
                                      f"parameter {list(params[int(parts[1])].shape)}")
    if "rng.torch" not in shapes:
        raise CheckpointError(f"checkpoint {weights} has no RNG state (rng.torch)")


def _reason(exc: BaseException) -> str:
    return short_repr(" ".join(str(exc).split()) or type(exc).__name__, 200).strip("'\"")


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
