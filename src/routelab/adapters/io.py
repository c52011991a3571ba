"""Adapters only, on disk: `adapters.safetensors` (every adapter tensor, keyed "<layer>.<tensor>") and
`adapters.json` (format, the AdapterSpec, and each wrapped layer's name and shape), written atomically.
Nothing is unpickled: safetensors are read through mmap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save
from torch import nn

from routelab._atomic import atomic_write_bytes, atomic_write_text
from routelab.adapters.linear import routed_lora_layers
from routelab.adapters.wrap import AdapterSpec, wrap_layers

ADAPTERS_JSON = "adapters.json"
ADAPTERS_WEIGHTS = "adapters.safetensors"
FORMAT = 1


def save_adapters(model: nn.Module, path: str | Path) -> Path:
    """Write the adapters of `model` (not its base weights) into the folder `path`; returns the folder."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_adapters: {folder} exists and is not a folder")
    layers = routed_lora_layers(model)
    if not layers:
        raise ValueError("save_adapters: the model has no routed-LoRA layers (see routelab.adapters.add_lora_experts)")
    if any(layer.spec is None for layer in layers.values()):
        raise ValueError("save_adapters: a routed-LoRA layer has no AdapterSpec (build them with add_lora_experts)")
    specs = {json.dumps(layer.spec.to_dict(), sort_keys=True) for layer in layers.values()}
    if len(specs) != 1:
        raise ValueError("save_adapters: the model's routed-LoRA layers were built with different options; "
                         "save_adapters stores one method and set of options per model")
    tensors = {f"{name}.{key}": value.detach().contiguous().cpu()
               for name, layer in layers.items() for key, value in layer.adapter.state_dict().items()}
    meta = {
        "format": FORMAT,
        "spec": next(iter(layers.values())).spec.to_dict(),
        "layers": {name: [layer.in_features, layer.out_features] for name, layer in layers.items()},
    }
    atomic_write_bytes(folder / ADAPTERS_WEIGHTS, save(tensors))
    atomic_write_text(folder / ADAPTERS_JSON, json.dumps(meta, indent=1))  # last: it names a complete weights file
    return folder


def read_adapter_meta(path: str | Path) -> dict[str, Any]:
    """The validated JSON of an adapters folder (errors name the file and the problem)."""
    meta_path = Path(path) / ADAPTERS_JSON
    if not meta_path.is_file():
        raise ValueError(f"load_adapters: {meta_path} not found (not an adapters folder written by save_adapters)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"load_adapters: {meta_path} is not readable JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int):
        raise ValueError(f"load_adapters: {meta_path} has no format version")
    if meta["format"] > FORMAT:
        raise ValueError(f"load_adapters: {meta_path} has format {meta['format']}, newer than this routelab's "
                         f"{FORMAT}; upgrade routelab")
    if not isinstance(meta.get("spec"), dict) or not isinstance(meta.get("layers"), dict) or not meta["layers"]:
        raise ValueError(f"load_adapters: {meta_path} lacks 'spec' or 'layers'")
    return meta


def load_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Put the adapters saved in `path` on `model` (in place; returns it). An unwrapped model is wrapped first with
    the saved method and options; an already wrapped one must have the same layers and options. Everything is
    checked before the model changes: every saved layer must exist as an nn.Linear of the saved shape, and the
    tensors must match the adapters' exactly (names and shapes)."""
    folder = Path(path)
    meta = read_adapter_meta(folder)
    try:
        spec = AdapterSpec(**meta["spec"])
    except TypeError as exc:
        raise ValueError(f"load_adapters: {folder / ADAPTERS_JSON} has an invalid spec ({exc})") from None
    saved_layers: dict[str, list[int]] = meta["layers"]
    wrapped = routed_lora_layers(model)
    modules = dict(model.named_modules())
    for name, shape in saved_layers.items():
        layer = wrapped.get(name, modules.get(name))
        if layer is None:
            raise ValueError(f"load_adapters: the adapters are for layer {name!r}, which the model does not have")
        if not isinstance(layer, nn.Linear) and layer not in wrapped.values():
            raise ValueError(f"load_adapters: {name!r} is a {type(layer).__name__}, not an nn.Linear")
        if [layer.in_features, layer.out_features] != list(shape):
            raise ValueError(f"load_adapters: layer {name!r} is {layer.in_features} → {layer.out_features} in the "
                             f"model but {shape[0]} → {shape[1]} in the saved adapters; they belong to a different "
                             "base model")
    if wrapped:
        if set(wrapped) != set(saved_layers):
            raise ValueError(f"load_adapters: the model is wrapped on {sorted(wrapped)} but the adapters are for "
                             f"{sorted(saved_layers)}")
        if any(layer.spec != spec for layer in wrapped.values()):
            raise ValueError(f"load_adapters: the model's adapters were built with other options than the saved "
                             f"ones ({spec})")
    tensors = load_file(str(folder / ADAPTERS_WEIGHTS))
    if not wrapped:
        # Build on copies first, so that a mismatch leaves the model untouched.
        for name in saved_layers:
            linear = modules[name]
            _check_state(name, spec.build(linear.in_features, linear.out_features).state_dict(), tensors, folder)
        wrap_layers(model, list(saved_layers), spec)
        wrapped = routed_lora_layers(model)
    for name, layer in wrapped.items():
        _check_state(name, layer.adapter.state_dict(), tensors, folder)
    for name, layer in wrapped.items():
        state = {key: tensors[f"{name}.{key}"] for key in layer.adapter.state_dict()}
        layer.adapter.load_state_dict(state, strict=True)
    return model


def _check_state(name: str, expected: dict, tensors: dict, folder: Path) -> None:
    prefix = f"{name}."
    saved = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(f"load_adapters: {folder / ADAPTERS_WEIGHTS} does not match layer {name!r}: missing "
                         f"{missing}, unexpected {unexpected}")
    for key, value in expected.items():
        if tuple(saved[key].shape) != tuple(value.shape):
            raise ValueError(f"load_adapters: {name}.{key} has shape {tuple(saved[key].shape)} in "
                             f"{folder / ADAPTERS_WEIGHTS}, expected {tuple(value.shape)}")
