"""Model folders: one trained `MoETransformerLM` with its tokenizer, saved and loaded by one call each.

Layout (format version `MODEL_FORMAT_VERSION`):

    config.json        {"format": "routelab-model", "format_version": 1, "dtype": "float32" | "bfloat16" | ...,
                        "model": the full ModelConfig (router, router options, k schedule, ...)}
    model.safetensors  the model's state dict; a tensor shared by several modules (a recurrent router's cell) is
                       stored once, its other names listed as aliases in the file's metadata ("routelab.aliases")
    tokenizer.json     the byte-level BPE tokenizer (`tokenizers` JSON) the model was trained with
    training.json      optional: how the model was trained (train config, data description, final metrics)

Loading validates the whole folder before building anything that is returned: the format and version, the config
(unknown fields, an unknown router, invalid values), every tensor name, shape and dtype in the safetensors header
against the model the config describes, and the tokenizer; any mismatch is one `ModelFolderError` naming the file
and the problem. Nothing is unpickled: JSON and safetensors only.

A folder is written into a temporary sibling and renamed into place, so a crash leaves either no folder or a
complete one. An existing folder is replaced only when it holds nothing but a model folder's files (and a
`routelab._runs` ownership marker, which is carried over), so nothing a user put there is deleted.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from routelab._atomic import atomic_write_bytes, atomic_write_text
from routelab._runs import MARKER as RUN_MARKER
from routelab._runs import TEMPORARY
from routelab.models.transformer import OPTIONAL_FIELDS, ModelConfig, MoETransformerLM

MODEL_FORMAT = "routelab-model"
MODEL_FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, TRAINING_FILE = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "training.json",
)
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, TRAINING_FILE)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_ALIASES_KEY = "routelab.aliases"
_MAX_JSON_BYTES = 64 << 20


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded (or a path that cannot be written); the message names file and problem."""


def save_model(
    model: MoETransformerLM,
    tokenizer: Any,
    path: str | os.PathLike[str],
    *,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (an `MoETransformerLM`) and its `tokenizers.Tokenizer` as a model folder at `path`.

    `training` (optional, JSON-serialisable) becomes training.json. An existing `path` is replaced only when it
    holds nothing but a model folder's files (or is empty); anything else is refused. Returns the folder's path.
    """
    from safetensors.torch import save

    if not isinstance(model, MoETransformerLM):
        raise TypeError(f"save_model expects a routelab MoETransformerLM, got {type(model).__name__}")
    if not hasattr(tokenizer, "to_str"):
        raise TypeError(f"save_model expects a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    path = Path(path)
    check_model_path(path)
    dtype = _model_dtype(model)
    config_text = json.dumps(
        {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "dtype": dtype,
            "model": model.config.to_dict(),
        },
        indent=1,
    )
    training_text = None if training is None else json.dumps(training, indent=1, allow_nan=False)
    tensors, aliases = _dedup_state_dict(model.state_dict())
    weights = save(tensors, metadata={"format": "pt", _ALIASES_KEY: json.dumps(aliases)})

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        tmp.mkdir()
        atomic_write_bytes(tmp / WEIGHTS_FILE, weights)
        atomic_write_text(tmp / TOKENIZER_FILE, tokenizer.to_str())
        if training_text is not None:
            atomic_write_text(tmp / TRAINING_FILE, training_text)
        atomic_write_text(tmp / CONFIG_FILE, config_text)
        _swap_into_place(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def load_model(path: str | os.PathLike[str]) -> tuple[MoETransformerLM, Any]:
    """(model, tokenizer) from a model folder written by `save_model`; the model is in eval mode, on the CPU, in
    the dtype it was saved in, and gives bit-identical logits to the saved one."""
    from safetensors import safe_open
    from tokenizers import Tokenizer

    folder = Path(path)
    config, dtype = read_model_config(folder)
    model_path = folder / WEIGHTS_FILE
    if not model_path.is_file():
        raise ModelFolderError(f"{model_path}: missing (a model folder holds {WEIGHTS_FILE})")

    # The expected names, shapes and dtypes come from a model built on the meta device (no memory, no init).
    try:
        with torch.device("meta"):
            expected = MoETransformerLM(config).to(dtype).state_dict()
    except (ValueError, TypeError) as exc:  # router options are checked when the routers are built
        raise ModelFolderError(f"{folder / CONFIG_FILE}: {_first_line(exc)}") from None
    try:
        with safe_open(str(model_path), framework="pt") as f:
            metadata = f.metadata() or {}
            stored = {key: f.get_slice(key) for key in f.keys()}
            header = {key: (tuple(s.get_shape()), s.get_dtype()) for key, s in stored.items()}
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise ModelFolderError(f"{model_path}: not a readable safetensors file ({_first_line(exc)})") from None
    try:
        aliases = json.loads(metadata.get(_ALIASES_KEY, "{}"))
        if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
            raise ValueError("not a mapping of names")
    except ValueError as exc:
        raise ModelFolderError(f"{model_path}: metadata {_ALIASES_KEY!r} is malformed ({exc})") from None
    bad_alias = sorted(k for k, v in aliases.items() if v not in header or k in header)
    if bad_alias:
        raise ModelFolderError(f"{model_path}: aliases {bad_alias} point to no stored tensor or shadow one")
    names = set(header) | set(aliases)
    missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or unexpected:
        parts = ([f"missing keys {_short(missing)}"] if missing else []) + (
            [f"unexpected keys {_short(unexpected)}"] if unexpected else []
        )
        raise ModelFolderError(f"{model_path}: does not match {CONFIG_FILE}'s model: {'; '.join(parts)}")
    for key, want in expected.items():
        shape, st_dtype = header[aliases.get(key, key)]
        if shape != tuple(want.shape):
            raise ModelFolderError(
                f"{model_path}: tensor {key!r} has shape {list(shape)}, the model in {CONFIG_FILE} needs "
                f"{list(want.shape)}"
            )
        if st_dtype != _st_dtype(want.dtype):
            raise ModelFolderError(
                f"{model_path}: tensor {key!r} has dtype {st_dtype}, the model in {CONFIG_FILE} needs "
                f"{_st_dtype(want.dtype)}"
            )

    tok_path = folder / TOKENIZER_FILE
    if not tok_path.is_file():
        raise ModelFolderError(f"{tok_path}: missing (a model folder holds {TOKENIZER_FILE})")
    try:
        tokenizer = Tokenizer.from_str(_read_text(tok_path))
    except ModelFolderError:
        raise
    except Exception as exc:
        raise ModelFolderError(f"{tok_path}: not a tokenizers JSON file ({_first_line(exc)})") from None
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ModelFolderError(
            f"{tok_path}: the tokenizer has {tokenizer.get_vocab_size()} tokens, more than the model's "
            f"vocab_size={config.vocab_size} in {CONFIG_FILE}"
        )
    training_path = folder / TRAINING_FILE
    if training_path.exists():
        _read_json(training_path)

    from safetensors.torch import load_file

    tensors = load_file(str(model_path))
    state = {key: tensors[aliases.get(key, key)] for key in expected}
    model = MoETransformerLM(config).to(dtype)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, tokenizer


def read_model_config(path: str | os.PathLike[str]) -> tuple[ModelConfig, torch.dtype]:
    """(ModelConfig, parameter dtype) from a model folder's config.json, validated; `ModelFolderError` otherwise."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: not a model folder (no such directory)")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ModelFolderError(f"{config_path}: missing (a model folder holds {CONFIG_FILE})")
    data = _read_json(config_path)
    if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
        raise ModelFolderError(f"{config_path}: not a routelab model config (no \"format\": \"{MODEL_FORMAT}\")")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFolderError(f"{config_path}: format_version must be a positive integer, got {version!r}")
    if version > MODEL_FORMAT_VERSION:
        raise ModelFolderError(
            f"{config_path}: format_version {version} is newer than this routelab reads ({MODEL_FORMAT_VERSION}); "
            "upgrade routelab"
        )
    dtype_name = data.get("dtype")
    if dtype_name not in _DTYPES:
        raise ModelFolderError(f"{config_path}: dtype must be one of {', '.join(_DTYPES)}, got {dtype_name!r}")
    fields_ = data.get("model")
    if not isinstance(fields_, dict):
        raise ModelFolderError(f"{config_path}: \"model\" must be a mapping of ModelConfig fields")
    valid = {f.name for f in fields(ModelConfig)}
    unknown, absent = sorted(set(fields_) - valid), sorted(valid - set(fields_) - set(OPTIONAL_FIELDS))
    if unknown:
        raise ModelFolderError(f"{config_path}: unknown model field(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    if absent:
        raise ModelFolderError(f"{config_path}: model field(s) {', '.join(absent)} missing")
    try:
        config = ModelConfig(**fields_)
        config.validate()
        config.per_layer_router_options()
    except (ValueError, TypeError) as exc:
        raise ModelFolderError(f"{config_path}: {_first_line(exc)}") from None
    return config, _DTYPES[dtype_name]


def is_model_folder(path: str | os.PathLike[str]) -> bool:
    """True when `path` is a directory holding a routelab model config.json (whatever its version)."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file() or config_path.is_symlink():
        return False
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == MODEL_FORMAT


def check_model_path(path: str | os.PathLike[str]) -> None:
    """Raise a ModelFolderError unless `save_model` may write `path` (new, empty, or only a model folder's files)."""
    path = Path(path)
    if path.is_symlink():
        raise ModelFolderError(f"{path}: is a symbolic link; refusing to write a model folder through it")
    if path.exists() and not path.is_dir():
        raise ModelFolderError(f"{path}: exists and is not a folder; refusing to replace it with a model folder")
    if not path.is_dir():
        return
    names = {entry.name for entry in os.scandir(path)}
    others = sorted(n for n in names - set(MODEL_FILES) - {RUN_MARKER} if not TEMPORARY.fullmatch(n))
    if others:
        raise ModelFolderError(
            f"{path}: holds {', '.join(others[:3])}{', …' if len(others) > 3 else ''}, which a model folder does not; "
            "refusing to replace it"
        )
    if names & set(MODEL_FILES) and not is_model_folder(path):
        raise ModelFolderError(f"{path}: is a non-empty folder that is not a routelab model folder; refusing to replace it")


def _swap_into_place(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.replace(tmp, path)
        return
    # An existing model folder or empty folder (checked): a run's ownership marker moves over to the new folder
    # (routelab._runs); the old folder is moved aside, the new one moved in, then the old one deleted.
    marker = path / RUN_MARKER
    if marker.is_file() and not marker.is_symlink():
        shutil.copyfile(marker, tmp / RUN_MARKER)
    old = path.parent / f".{path.name}.{secrets.token_hex(6)}.old"
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old)


def _dedup_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to store, aliases): a tensor that several names share (same storage and view) is stored once."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in state.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()))
        if value.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = value.detach().contiguous().cpu()
    return tensors, aliases


def _model_dtype(model: torch.nn.Module) -> str:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        raise ValueError(f"save_model needs every parameter in one dtype, got {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"save_model: parameter dtype {dtype} is not one of {', '.join(_DTYPES)}")


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def _st_dtype(dtype: torch.dtype) -> str:
    """The dtype's name as a safetensors header writes it."""
    return _ST_DTYPES.get(dtype, str(dtype))


def _read_text(path: Path) -> str:
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise ModelFolderError(f"{path}: larger than {_MAX_JSON_BYTES >> 20} MiB; not a model folder file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ModelFolderError(f"{path}: not UTF-8 text") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{path}: not valid JSON ({exc})") from None


def _short(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', … {len(keys) - limit} more' if len(keys) > limit else ''}]"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
