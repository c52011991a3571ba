"""Comparison configurations: presets (YAML inside the package), user YAML, command-line overrides, validation.

A configuration has five sections (see presets/default.yaml): `data`, `model` (the `ModelConfig` fields shared by
every variant), `train` (the `TrainConfig` fields), `reference_k` and `variants`, a list of {name, router, options,
k_schedule}. Every field is checked before anything trains; an error names the field and the valid values.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from routelab.models.transformer import ModelConfig, MoETransformerLM
from routelab.routing.registry import create_router, list_routers, router_class
from routelab.train.loop import TrainConfig

PRESETS = ("smoke", "default")
TOP_FIELDS = {"description", "data", "model", "train", "reference_k", "variants"}
DATA_FIELDS = {"source", "files", "max_chars", "vocab_size", "val_fraction"}
# Model fields that every variant shares; router, router_options, k_schedule and vocab_size are set per variant/data.
PER_VARIANT = {"router", "router_options", "k_schedule", "vocab_size"}
MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - PER_VARIANT
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
VARIANT_FIELDS = {"name", "router", "options", "k_schedule"}


class ConfigError(ValueError):
    """An invalid comparison configuration; the message names the field."""


def load_preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    text = resources.files("routelab.compare").joinpath("presets", f"{name}.yaml").read_text()
    return yaml.safe_load(text)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping (data:, model:, train:, variants:), got {type(data).__name__}"
        )
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else (lists included) replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve(
    *,
    preset: str = "default",
    config_file: str | Path | None = None,
    routers: list[str] | None = None,
    data_files: list[str] | None = None,
    steps: int | None = None,
    seed: int | None = None,
    base: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The validated configuration and the notes to print (e.g. preset entries skipped as unregistered).
    `base`: a configuration to start from instead of the preset (`routelab train` builds its own)."""
    cfg = copy.deepcopy(base) if base is not None else load_preset(preset)
    if config_file is not None:
        cfg = merge(cfg, load_yaml(config_file))
    _check_sections(cfg)  # before the overrides below read and write the sections
    if data_files:
        cfg["data"] = merge(cfg["data"], {"source": "files", "files": list(data_files)})
    if steps is not None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ConfigError(f"--steps must be a positive integer, got {steps!r}")
        train = cfg["train"]
        train["steps"] = steps
        # shorten warm-up and the evaluation interval to fit; a value of the wrong type is left for validate()
        if _is_int(train.get("warmup", 0)):
            train["warmup"] = min(train.get("warmup", 0), max(0, steps // 10))
        if _is_int(train.get("eval_every", steps)):
            train["eval_every"] = min(train.get("eval_every", steps), steps)
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"--seed must be an integer >= 0, got {seed!r}")
        cfg["train"]["seed"] = seed
    notes = validate(cfg)
    if routers:  # only the variants asked for matter; an unregistered one among them is an error, raised below
        notes = []
    notes += select_variants(cfg, routers)
    return cfg, notes


def validate(cfg: dict[str, Any]) -> list[str]:
    """Check every field (raising ConfigError naming it); returns notes. Variants whose router is not registered are
    removed with a note, so a preset written for routers not installed still runs with the others."""
    _check_sections(cfg)
    if not isinstance(cfg.get("description", ""), str):
        raise ConfigError(f"description must be a string, got {cfg['description']!r}")
    data = cfg["data"]
    if data.get("source", "builtin") not in ("builtin", "files"):
        raise ConfigError(f"data.source must be 'builtin' or 'files', got {data.get('source')!r}")
    if data.get("source") == "files":
        files = data.get("files")
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise ConfigError("data.files must be a non-empty list of file paths when data.source is 'files'")
    _int("data.max_chars", data.get("max_chars", 0), 0)
    _int("data.vocab_size", data.get("vocab_size", 4096), 257)
    vf = data.get("val_fraction", 0.1)
    if not isinstance(vf, (int, float)) or isinstance(vf, bool) or not 0 < vf < 1:
        raise ConfigError(f"data.val_fraction must be a number in (0, 1), got {vf!r}")
    _int("reference_k", cfg.get("reference_k", 2), 1)
    try:
        train_cfg = TrainConfig(**cfg["train"])
        train_cfg.validate()
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    model_base = dict(cfg["model"])
    model_base.setdefault("max_seq_len", train_cfg.seq_len)
    _int("model.max_seq_len", model_base["max_seq_len"], 1)
    if model_base["max_seq_len"] < train_cfg.seq_len:
        raise ConfigError(
            f"model.max_seq_len={model_base['max_seq_len']} is shorter than train.seq_len={train_cfg.seq_len}"
        )
    cfg["model"] = model_base

    variants = cfg.get("variants")
    if not isinstance(variants, list) or not variants:
        raise ConfigError("variants: must be a non-empty list of {name, router, options, k_schedule}")
    notes, kept, names = [], [], set()
    registered = set(list_routers())
    for i, v in enumerate(variants):
        where = f"variants[{i}]"
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: must be a mapping with fields {', '.join(sorted(VARIANT_FIELDS))}")
        _fields(where, v, VARIANT_FIELDS)
        if not isinstance(v.get("router"), str):
            raise ConfigError(
                f"{where}.router: a registered router name is required; valid names: {', '.join(sorted(registered))}"
            )
        v.setdefault("name", v["router"])
        v.setdefault("options", {})
        v.setdefault("k_schedule", None)
        if not isinstance(v["name"], str) or not re.fullmatch(r"[A-Za-z0-9_.+-]+", v["name"]):
            raise ConfigError(f"{where}.name must be letters, digits and _ . + - only, got {v['name']!r}")
        if v["name"] in names:
            raise ConfigError(f"{where}.name {v['name']!r} is used by two variants")
        names.add(v["name"])
        if not isinstance(v["options"], dict):
            raise ConfigError(f"{where}.options must be a mapping of router options, got {v['options']!r}")
        if v["k_schedule"] is not None and not isinstance(v["k_schedule"], dict):
            raise ConfigError(
                f"{where}.k_schedule must be null or a mapping {{shape, k_max, k, match_budget}}, "
                f"got {v['k_schedule']!r}"
            )
        if v["router"] not in registered:
            notes.append(
                f"skipping variant {v['name']!r}: router {v['router']!r} is not registered in this installation"
            )
            continue
        check_variant(cfg, v, where)
        kept.append(v)
    if not kept:
        raise ConfigError(
            f"no variant has a registered router; registered routers: {', '.join(sorted(registered))}"
        )
    cfg["variants"] = kept
    return notes


def check_variant(cfg: dict[str, Any], v: dict[str, Any], where: str) -> None:
    """Build the variant's routers (small, cheap) so that bad options fail now, not after other variants trained."""
    try:
        mc = model_config(cfg, v, vocab_size=cfg["data"].get("vocab_size", 4096))
        mc.validate()
        per_layer = mc.per_layer_router_options()
        shared = router_class(mc.router).shared_modules(
            d_model=mc.d_model, num_experts=mc.num_experts, **mc.router_options
        )
        for opts in per_layer:
            create_router(mc.router, d_model=mc.d_model, num_experts=mc.num_experts, **{**opts, **shared})
        with torch.device("meta"):  # the whole model, without memory: layer-level errors surface now
            MoETransformerLM(mc)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where} ({v['name']}): {exc}") from None


def model_config(cfg: dict[str, Any], variant: dict[str, Any], *, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        **cfg["model"], vocab_size=vocab_size, router=variant["router"],
        router_options=dict(variant.get("options") or {}), k_schedule=variant.get("k_schedule"),
    )


def select_variants(cfg: dict[str, Any], routers: list[str] | None) -> list[str]:
    """Keep the variants named (by variant or router name); a registered router without a preset entry is added
    with its default options. Unknown names raise a ConfigError listing the valid ones."""
    if not routers:
        return []
    registered = set(list_routers())
    by_name = {v["name"]: v for v in cfg["variants"]}
    chosen, notes = [], []
    for name in routers:
        matches = [by_name[name]] if name in by_name else [v for v in cfg["variants"] if v["router"] == name]
        if not matches:
            if name not in registered:
                valid = sorted(registered | set(by_name))
                raise ConfigError(f"unknown router {name!r}; valid names: {', '.join(valid)}")
            v = {"name": name, "router": name, "options": {}, "k_schedule": None}
            check_variant(cfg, v, f"--routers {name}")
            notes.append(f"router {name!r} has no preset entry: running it with its default options")
            matches = [v]
        chosen.extend(m for m in matches if m not in chosen)
    cfg["variants"] = chosen
    return notes


def _check_sections(cfg: dict[str, Any]) -> None:
    """The configuration is a mapping with known top-level fields, and data, model and train are mappings."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"the configuration must be a mapping of {', '.join(sorted(TOP_FIELDS))}")
    _fields("config", cfg, TOP_FIELDS)
    for section, fields in (("data", DATA_FIELDS), ("model", MODEL_FIELDS), ("train", TRAIN_FIELDS)):
        if not isinstance(cfg.get(section), dict):
            raise ConfigError(f"{section}: must be a mapping of {', '.join(sorted(fields))}, got {cfg.get(section)!r}")
        _fields(section, cfg[section], fields)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fields(where: str, mapping: dict[str, Any], valid: set[str]) -> None:
    unknown = sorted(set(mapping) - valid)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(valid))}")


def _int(name: str, value: Any, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
