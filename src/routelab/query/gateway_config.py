"""pool.yaml for `routelab serve`: the models behind the gateway, the saved routers, the default, limits and auth.

Everything is validated when the file is loaded, before a socket opens; each error is one line naming the file,
the field (as a dotted path) and what is allowed. Relative paths in the file are relative to the file's folder, so a
pool.yaml and the router folders beside it can move together.

    models:                        # at least one; the names are what clients send as `model`
      gpt-4o-mini:                 # an upstream OpenAI-compatible endpoint
        base_url: https://api.openai.com/v1
        api_key_env: OPENAI_API_KEY      # optional: the key is read from this environment variable at startup
        model: gpt-4o-mini               # optional: the upstream's own name (default: the entry's name)
        input_price: 0.15                # $ per million input tokens (default 0)
        output_price: 0.60               # $ per million output tokens (default 0)
        timeout: 30                      # seconds (default 60)
      tiny:                        # a local routelab model folder, served in-process
        path: runs/tiny/model
    routers:                       # optional: saved router folders (`routelab.query.load_router`)
      knn: routers/knn                   # `model: router-knn-0.5` routes with knob 0.5
      mf: {path: routers/mf, knob: 0.1}  # a default knob: `model: router-mf` means router-mf-0.1
    default: router-knn-0.5        # what `model: auto` means (a router spec or a model name); optional
    log: logs/routing.jsonl        # optional JSONL routing log (appended to, never truncated)
    max_request_bytes: 1048576     # optional (default 1 MiB)
    api_keys_env: ROUTELAB_API_KEYS      # optional: comma-separated bearer tokens clients must send
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

MAX_CONFIG_BYTES = 1 << 20
# A YAML file this small can still expand, through aliases, into a structure with billions of nodes; the walk that
# validates it stops at this many.
MAX_CONFIG_NODES = 100_000
TOP_FIELDS = ("models", "routers", "default", "log", "max_request_bytes", "api_keys_env")
UPSTREAM_FIELDS = ("base_url", "api_key_env", "model", "input_price", "output_price", "timeout")
LOCAL_FIELDS = ("path", "input_price", "output_price", "timeout", "max_new_tokens")
ROUTER_FIELDS = ("path", "knob")
RESERVED_NAMES = ("auto",)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class GatewayConfigError(ValueError):
    """An invalid pool.yaml; the message is one line naming the file and the field."""


@dataclass(frozen=True)
class UpstreamModel:
    """An OpenAI-compatible endpoint; `api_key` was read from `api_key_env` at load time (never from the file)."""

    name: str
    base_url: str
    upstream_model: str
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)
    input_price: float = 0.0
    output_price: float = 0.0
    timeout: float = 60.0


@dataclass(frozen=True)
class LocalModel:
    """A routelab model folder (`routelab.load_model`), generated from in this process."""

    name: str
    path: Path
    input_price: float = 0.0
    output_price: float = 0.0
    timeout: float = 60.0
    max_new_tokens: int = 256


@dataclass(frozen=True)
class RouterEntry:
    name: str
    path: Path
    knob: float | None = None


@dataclass(frozen=True)
class PoolConfig:
    models: dict[str, UpstreamModel | LocalModel]
    routers: dict[str, RouterEntry] = field(default_factory=dict)
    default: str | None = None
    log: Path | None = None
    max_request_bytes: int = 1 << 20
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    source: str = "<pool>"


def load_pool(path: str | Path, *, environ: dict[str, str] | None = None) -> PoolConfig:
    """Read and validate pool.yaml. Raises GatewayConfigError (one line) on anything wrong."""
    path = Path(path)
    if not path.is_file():
        raise GatewayConfigError(f"config file not found (or not a regular file): {path}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise GatewayConfigError(f"config file {path} is {size} bytes; a pool file may hold at most {MAX_CONFIG_BYTES}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise GatewayConfigError(f"cannot read config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise GatewayConfigError(f"config file {path} is not valid YAML{line}: {problem}") from None
    _check_size(data, path)
    return parse_pool(data, base_dir=path.parent, source=str(path), environ=environ)


def parse_pool(
    data: Any, *, base_dir: Path = Path("."), source: str = "<pool>", environ: dict[str, str] | None = None
) -> PoolConfig:
    """Validate an already-parsed pool mapping (what load_pool reads from YAML)."""
    env = os.environ if environ is None else environ

    def err(where: str, message: str) -> GatewayConfigError:
        return GatewayConfigError(f"{source}: {where}: {message}")

    if not isinstance(data, dict):
        raise GatewayConfigError(f"{source}: must hold a mapping with a `models:` section, got {type(data).__name__}")
    _unknown(data, TOP_FIELDS, "top level", err)
    raw_models = data.get("models")
    if not isinstance(raw_models, dict) or not raw_models:
        raise err("models", "must be a non-empty mapping of model name -> {base_url: ...} or {path: ...}")
    models: dict[str, UpstreamModel | LocalModel] = {}
    for name, entry in raw_models.items():
        where = f"models.{name}"
        _check_name(name, where, err)
        if not isinstance(entry, dict):
            raise err(where, f"must be a mapping with base_url: (an upstream) or path: (a local model), got {entry!r}")
        if ("base_url" in entry) == ("path" in entry):
            raise err(where, "needs exactly one of base_url: (an upstream endpoint) or path: (a local model folder)")
        prices = {k: _number(entry.get(k, 0.0), f"{where}.{k}", err, low=0.0) for k in ("input_price", "output_price")}
        timeout = _number(entry.get("timeout", 60.0), f"{where}.timeout", err, low=0.0, open_low=True)
        if "base_url" in entry:
            _unknown(entry, UPSTREAM_FIELDS, where, err)
            models[name] = _upstream(name, entry, where, prices, timeout, env, err)
        else:
            _unknown(entry, LOCAL_FIELDS, where, err)
            folder = _path(entry["path"], f"{where}.path", base_dir, err)
            if not folder.is_dir():
                raise err(f"{where}.path", f"model folder not found: {folder}")
            max_new = entry.get("max_new_tokens", 256)
            if not isinstance(max_new, int) or isinstance(max_new, bool) or not 1 <= max_new <= 1_000_000:
                raise err(f"{where}.max_new_tokens", f"must be an integer in [1, 1000000], got {max_new!r}")
            models[name] = LocalModel(name=name, path=folder, timeout=timeout, max_new_tokens=max_new, **prices)

    raw_routers = data.get("routers") or {}
    if not isinstance(raw_routers, dict):
        raise err("routers", f"must be a mapping of router name -> folder (or {{path:, knob:}}), got {raw_routers!r}")
    routers: dict[str, RouterEntry] = {}
    for name, entry in raw_routers.items():
        where = f"routers.{name}"
        _check_name(name, where, err)
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or "path" not in entry:
            raise err(where, f"must be a folder path or a mapping {{path:, knob:}}, got {entry!r}")
        _unknown(entry, ROUTER_FIELDS, where, err)
        folder = _path(entry["path"], f"{where}.path", base_dir, err)
        if not folder.is_dir():
            raise err(f"{where}.path", f"router folder not found: {folder}")
        knob = entry.get("knob")
        if knob is not None:
            knob = _number(knob, f"{where}.knob", err)
        routers[name] = RouterEntry(name=name, path=folder, knob=knob)

    default = data.get("default")
    if default is not None:
        if not isinstance(default, str):
            raise err("default", f"must be a model name or router-<name>-<knob>, got {default!r}")
        if default == "auto":
            raise err("default", "cannot be 'auto' itself; name a model or router-<name>-<knob>")
        try:
            resolve_model_name(default, models, routers)
        except LookupError as exc:
            raise err("default", str(exc)) from None

    log = data.get("log")
    if log is not None:
        log = _path(log, "log", base_dir, err)
        if log.exists() and not log.is_file():
            raise err("log", f"{log} exists and is not a regular file")
        if not log.parent.is_dir():
            raise err("log", f"folder {log.parent} does not exist")

    max_bytes = data.get("max_request_bytes", 1 << 20)
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or not 1024 <= max_bytes <= 1 << 30:
        raise err("max_request_bytes", f"must be an integer in [1024, {1 << 30}], got {max_bytes!r}")

    api_keys: tuple[str, ...] = ()
    keys_env = data.get("api_keys_env")
    if keys_env is not None:
        if not isinstance(keys_env, str) or not ENV_RE.match(keys_env):
            raise err("api_keys_env", f"must be an environment variable name, got {keys_env!r}")
        if not env.get(keys_env, "").strip():
            raise err("api_keys_env", f"environment variable {keys_env} is not set (or empty)")
        api_keys = tuple(k.strip() for k in env[keys_env].split(",") if k.strip())
        if not api_keys:  # "," would otherwise turn authentication off without a word
            raise err("api_keys_env", f"environment variable {keys_env} holds no keys (comma-separated tokens)")

    return PoolConfig(models=models, routers=routers, default=default, log=log, max_request_bytes=max_bytes,
                      api_keys=api_keys, source=source)


@dataclass(frozen=True)
class Route:
    """What a request's `model` field resolved to: one pool model (`router` is None) or a router with its knob."""

    model: str | None = None
    router: str | None = None
    knob: float | None = None

    @property
    def label(self) -> str:
        return self.model if self.router is None else f"router-{self.router}-{self.knob:g}"


def resolve_model_name(
    name: str, models: dict[str, Any], routers: dict[str, RouterEntry], default: str | None = None
) -> Route:
    """Resolve a request's `model`: a pool model (pass-through), `router-<name>-<knob>` (RouteLLM's convention; the
    knob is a float handed to the router as its knob), `router-<name>` (the router's configured knob), or `auto`
    (`default`). Raises LookupError with a one-line message listing what is valid."""
    if name == "auto":
        if default is None:
            raise LookupError("model 'auto' is not configured on this gateway (set default: in pool.yaml)")
        name = default
    if name in models:
        return Route(model=name)
    if name.startswith("router-"):
        rest = name[len("router-"):]
        if rest in routers:
            knob = routers[rest].knob
            if knob is None:
                raise LookupError(f"router {rest!r} has no default knob; use router-{rest}-<knob>, e.g. "
                                  f"router-{rest}-0.5")
            return Route(router=rest, knob=knob)
        # The knob is what follows the last '-' whose remainder parses as a finite float, so router names may
        # contain '-' and knobs may be negative or written with an exponent (router-mf-1e-3).
        for i in range(len(rest) - 1, 0, -1):
            if rest[i] == "-" and rest[:i] in routers:
                try:
                    knob = float(rest[i + 1:])
                except ValueError:
                    break
                if not math.isfinite(knob):
                    break
                return Route(router=rest[:i], knob=knob)
    valid = sorted(models) + [f"router-{r}-<knob>" for r in sorted(routers)] + (["auto"] if default else [])
    shown = name if len(name) <= 100 else name[:100] + "..."
    raise LookupError(f"the model {shown!r} does not exist on this gateway; valid: {', '.join(valid)}")


def _upstream(name, entry, where, prices, timeout, env, err) -> UpstreamModel:
    base_url = entry["base_url"]
    parts = urlsplit(base_url) if isinstance(base_url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise err(f"{where}.base_url", f"must be an http:// or https:// URL, got {base_url!r}")
    upstream_model = entry.get("model", name)
    if not isinstance(upstream_model, str) or not upstream_model:
        raise err(f"{where}.model", f"must be a non-empty string (the upstream's model name), got {upstream_model!r}")
    key_env = entry.get("api_key_env")
    key = None
    if key_env is not None:
        if not isinstance(key_env, str) or not ENV_RE.match(key_env):
            raise err(f"{where}.api_key_env", f"must be an environment variable name, got {key_env!r}")
        key = env.get(key_env)
        if not key:
            raise err(f"{where}.api_key_env", f"environment variable {key_env} is not set (or empty)")
    return UpstreamModel(name=name, base_url=base_url.rstrip("/"), upstream_model=upstream_model,
                         api_key_env=key_env, api_key=key, timeout=timeout, **prices)


def _check_name(name: Any, where: str, err) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise err(where, "a name must be 1-128 characters of letters, digits and ._:/@+- starting with a letter or "
                  f"digit, got {name!r}")
    if name in RESERVED_NAMES or name.startswith("router-"):
        raise err(where, f"{name!r} is reserved (auto and router-* name routes); choose another name")


def _unknown(entry: dict, allowed: tuple[str, ...], where: str, err) -> None:
    extra = [k for k in entry if k not in allowed]
    if extra:
        raise err(where, f"unknown field {extra[0]!r}; allowed: {', '.join(allowed)}")


def _number(value: Any, where: str, err, *, low: float | None = None, open_low: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if not ok:
        rng = "" if low is None else (f" > {low:g}" if open_low else f" >= {low:g}")
        raise err(where, f"must be a finite number{rng}, got {value!r}")
    return float(value)


def _path(value: Any, where: str, base_dir: Path, err) -> Path:
    if not isinstance(value, str) or not value:
        raise err(where, f"must be a path string, got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base_dir / p


def _check_size(data: Any, path: Path) -> None:
    """Walk the parsed YAML with a node budget: aliases can make a small file expand exponentially."""
    budget = MAX_CONFIG_NODES
    stack = [data]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise GatewayConfigError(f"config file {path} expands (through YAML aliases) to more than "
                                     f"{MAX_CONFIG_NODES} values; a pool file needs far fewer")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
