"""Comparison configurations: presets (YAML inside the package), user YAML, command-line overrides, validation.

A configuration has five sections (see presets/default.yaml): `data`, `model` (the `ModelConfig` fields shared by
every variant), `train` (the `TrainConfig` fields), `reference_k`, `seeds` (optional, default 1: each variant trains
with train.seed, train.seed+1, ..., and the report shows intervals) and `variants`, a list of {name, router,
options, k_schedule, model}, `model` (optional) holding model fields that differ for that variant
(chain_iterations, expert_pool, expert_widths, ...). Every field is checked before anything trains; an error names the field and the valid values.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import stat
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from routelab.models.transformer import ModelConfig, MoETransformerLM
from routelab.routing.registry import create_router, list_routers, router_class
from routelab._checks import INT64_MAX, short_repr
from routelab.train.loop import TrainConfig
from routelab.train.memory import check_training_memory

PRESETS = ("smoke", "default", "depth", "paper", "diffusion")
TOP_FIELDS = {"description", "data", "model", "train", "reference_k", "seeds", "variants"}
MAX_SEEDS = 100
DATA_FIELDS = {"source", "files", "max_chars", "vocab_size", "val_fraction"}
# Model fields that every variant shares; router, router_options, k_schedule and vocab_size are set per variant/data.
PER_VARIANT = {"router", "router_options", "k_schedule", "vocab_size"}
MODEL_FIELDS = ({f.name for f in dataclasses.fields(ModelConfig)} - PER_VARIANT) | {"kind"}
# model.kind: "lm" (autoregressive, MoETransformerLM) or "diffusion_lm" (masked diffusion, MaskedDiffusionLM).
MODEL_KINDS = ("lm", "diffusion_lm")
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
MODEL_INT_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "num_experts", "moe_every",
                    "shared_experts", "max_seq_len")
VARIANT_FIELDS = {"name", "router", "options", "k_schedule", "model"}
# A variant name is a folder name: no "." or "..", no hidden names, short enough for every file system.
MAX_NAME = 100
VARIANT_NAME = rf"[A-Za-z0-9][A-Za-z0-9_.+-]{{0,{MAX_NAME - 1}}}"
# Config files: regular files of at most MAX_CONFIG_BYTES, whose YAML expands to at most MAX_CONFIG_NODES values
# (aliases included: a "billion laughs" file of a kilobyte expands to 10^9).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000


class ConfigError(ValueError):
    """An invalid comparison configuration; the message names the field (one line, at most ~1000 characters)."""

    def __init__(self, message: str) -> None:
        message = " ".join(str(message).split())
        if len(message) > 1000:
            message = f"{message[:960]}... ({len(message):,} characters)"
        super().__init__(message)


def load_preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    text = resources.files("routelab.compare").joinpath("presets", f"{name}.yaml").read_text()
    return yaml.safe_load(text)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A user's YAML configuration: a regular file of at most MAX_CONFIG_BYTES whose values, aliases expanded, number
    at most MAX_CONFIG_NODES (FIFOs, devices, huge files and alias bombs are refused before they are read or
    expanded)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"config file {path} is not a regular file (a folder, device or pipe); give a YAML file")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {st.st_size:,} bytes; a configuration is at most "
                          f"{MAX_CONFIG_BYTES:,} bytes")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # the file may have grown since the stat
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is over {MAX_CONFIG_BYTES:,} bytes")
        data = yaml.load(raw.decode("utf-8"), Loader=_BoundedLoader)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except _TooLarge:
        raise ConfigError(f"config file {path} expands to more than {MAX_CONFIG_NODES:,} values (YAML aliases "
                          f"nested too deep?); write the values out") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())[:300]}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping (data:, model:, train:, variants:), got {type(data).__name__}"
        )
    return data


class _TooLarge(Exception):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts the values a document expands to, each alias counting its whole subtree again."""

    def construct_document(self, node):  # noqa: ANN001, ANN201
        sizes: dict[int, int] = {}

        def expanded(n) -> int:  # noqa: ANN001
            if id(n) in sizes:
                return sizes[id(n)]
            sizes[id(n)] = 1  # a recursive alias counts once here; the constructor handles recursion itself
            total = 1
            if isinstance(n, yaml.SequenceNode):
                total += sum(expanded(c) for c in n.value)
            elif isinstance(n, yaml.MappingNode):
                total += sum(expanded(k) + expanded(v) for k, v in n.value)
            if total > MAX_CONFIG_NODES:
                raise _TooLarge
            sizes[id(n)] = total
            return total

        expanded(node)
        return super().construct_document(node)


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
    seeds: int | None = None,
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
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= INT64_MAX:
            raise ConfigError(f"--steps must be a positive integer <= {INT64_MAX}, got {short_repr(steps)}")
        train = cfg["train"]
        train["steps"] = steps
        # shorten warm-up and the evaluation interval to fit; a value of the wrong type is left for validate()
        if _is_int(train.get("warmup", 0)):
            train["warmup"] = min(train.get("warmup", 0), max(0, steps // 10))
        if _is_int(train.get("eval_every", steps)):
            train["eval_every"] = min(train.get("eval_every", steps), steps)
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= INT64_MAX:
            raise ConfigError(f"--seed must be an integer >= 0 and <= {INT64_MAX}, got {short_repr(seed)}")
        cfg["train"]["seed"] = seed
    if seeds is not None:
        if not _is_int(seeds) or not 1 <= seeds <= MAX_SEEDS:
            raise ConfigError(f"--seeds must be an integer from 1 to {MAX_SEEDS}, got {short_repr(seeds)}")
        cfg["seeds"] = seeds
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
        raise ConfigError(f"description must be a string, got {short_repr(cfg['description'])}")
    data = cfg["data"]
    if data.get("source", "builtin") not in ("builtin", "files"):
        raise ConfigError(f"data.source must be 'builtin' or 'files', got {short_repr(data.get('source'))}")
    if data.get("source") == "files":
        files = data.get("files")
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise ConfigError("data.files must be a non-empty list of file paths when data.source is 'files'")
    _int("data.max_chars", data.get("max_chars", 0), 0)
    _int("data.vocab_size", data.get("vocab_size", 4096), 257)
    vf = data.get("val_fraction", 0.1)
    if not isinstance(vf, (int, float)) or isinstance(vf, bool) or not 0 < vf < 1:
        raise ConfigError(f"data.val_fraction must be a number in (0, 1), got {short_repr(vf)}")
    _int("reference_k", cfg.get("reference_k", 2), 1)
    n_seeds = cfg.get("seeds", 1)
    if not _is_int(n_seeds) or not 1 <= n_seeds <= MAX_SEEDS:
        raise ConfigError(f"seeds must be an integer from 1 to {MAX_SEEDS} (seeds per variant), got "
                          f"{short_repr(n_seeds)}")
    try:
        train_cfg = TrainConfig(**cfg["train"])
        train_cfg.validate()
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    model_base = dict(cfg["model"])
    if model_base.get("kind", "lm") not in MODEL_KINDS:
        raise ConfigError(f"model.kind must be one of {', '.join(MODEL_KINDS)}, got {short_repr(model_base['kind'])}")
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
        if not isinstance(v["name"], str) or not re.fullmatch(VARIANT_NAME, v["name"]):
            raise ConfigError(f"{where}.name must be 1-{MAX_NAME} letters, digits and _ . + -, starting with a letter "
                              f"or digit (it names a folder), got {short_repr(v['name'])}")
        if v["name"] in names:
            raise ConfigError(f"{where}.name {v['name']!r} is used by two variants")
        names.add(v["name"])
        if not isinstance(v["options"], dict):
            raise ConfigError(f"{where}.options must be a mapping of router options, got {short_repr(v['options'])}")
        if v["k_schedule"] is not None and not isinstance(v["k_schedule"], dict):
            raise ConfigError(
                f"{where}.k_schedule must be null or a mapping {{shape, k_max, k, match_budget}}, "
                f"got {short_repr(v['k_schedule'])}"
            )
        if "model" in v:  # per-variant model fields (chain_iterations, expert_pool, ...) over the shared `model`
            if not isinstance(v["model"], dict):
                raise ConfigError(f"{where}.model must be a mapping of model fields, got {short_repr(v['model'])}")
            _fields(f"{where}.model", v["model"], MODEL_FIELDS)
        if v["router"] not in registered:
            notes.append(
                f"skipping variant {v['name']!r}: router {short_repr(v['router'])} is not registered in this installation"
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
        if model_kind(cfg) == "lm" and router_class(mc.router).needs_timestep:
            raise ValueError(f"router {mc.router!r} needs a diffusion timestep, which the autoregressive LM does not "
                             "have; use model.kind: diffusion_lm (e.g. --preset diffusion)")
        for name in MODEL_INT_FIELDS:
            _int(f"model.{name}", getattr(mc, name), 0)
        # sizes against the machine's RAM before any of them is allocated (the routers below are real)
        check_training_memory(mc, TrainConfig(**cfg["train"]))
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


def model_kind(cfg: dict[str, Any]) -> str:
    """The configuration's model.kind ("lm" when absent)."""
    return cfg["model"].get("kind", "lm")


def model_config(cfg: dict[str, Any], variant: dict[str, Any], *, vocab_size: int) -> ModelConfig:
    fields = {k: v for k, v in cfg["model"].items() if k != "kind"}
    return ModelConfig(
        **{**fields, **(variant.get("model") or {})}, vocab_size=vocab_size, router=variant["router"],
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
            raise ConfigError(f"{section}: must be a mapping of {', '.join(sorted(fields))}, got {short_repr(cfg.get(section))}")
        _fields(section, cfg[section], fields)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fields(where: str, mapping: dict[str, Any], valid: set[str]) -> None:
    unknown = sorted(set(mapping) - valid)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(valid))}")


def _int(name: str, value: Any, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {short_repr(value)}")
    if value > INT64_MAX:
        raise ConfigError(f"{name} must be an integer <= {INT64_MAX} (the int64 range), got {short_repr(value)}")
