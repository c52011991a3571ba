"""`routelab train`: train one model with compare's data pipeline and loop, and write its model folder.

The run folder (--out DIR) follows routelab._runs' rules (a marker file, `--overwrite` for a foreign non-empty
folder, nothing deleted that routelab did not write, no links followed) and holds `train.yaml` (the exact
configuration), `metrics.jsonl`, the training checkpoint (safetensors + JSON, written atomically every `checkpoint_every` steps) and,
at the end, the model folder `DIR/model/` (`routelab.load_model` reads it). `--resume` continues from the checkpoint;
a killed and resumed run ends with the same weights as an uninterrupted one (the loop's determinism).

Presets build on compare's: `tiny` is the smoke model (under a minute here), `small` the default compare model;
both with the top-k router (k=2). A YAML file (`--config`) is merged over the preset; its `model:` section may also
set `router`, `router_options` and `k_schedule`.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

from routelab.commands import fail

TRAIN_PRESETS = {
    # name: (compare preset it builds on, overrides)
    "tiny": ("smoke", {"train": {"steps": 100, "warmup": 10, "eval_every": 25, "checkpoint_every": 25}}),
    "small": ("default", {}),
}
DEFAULT_ROUTER = {"router": "topk", "router_options": {"k": 2}, "k_schedule": None}
CONFIG_FILE = "train.yaml"
MODEL_DIR = "model"


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="train one MoE LM and write its model folder (DIR/model: config.json, model.safetensors, tokenizer.json)",
        description="Train one MoE language model with the same data pipeline, determinism, checkpoints and "
        "validation as compare, and write the model folder DIR/model/ (load it with routelab.load_model, "
        "`routelab eval` or `routelab generate`).",
    )
    parser.add_argument("--preset", default="tiny", choices=tuple(TRAIN_PRESETS),
                        help="tiny (under a minute) or small (the default compare model) (default: %(default)s)")
    parser.add_argument("--config", metavar="YAML", help="a YAML file (data:, model:, train:) merged over the preset; "
                        "model: may set router, router_options and k_schedule (default router: topk, k=2)")
    parser.add_argument("--data", nargs="+", metavar="FILE", help="UTF-8 text files, each one domain "
                        "(default: the built-in corpus from the Python standard library)")
    parser.add_argument("--out", required=True, help="run folder; the model folder is written to OUT/model")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out that is not a routelab run (files routelab did not write "
                        "are still never deleted)")
    parser.add_argument("--steps", type=int, help="training steps (overrides the preset)")
    parser.add_argument("--seed", type=int, help="seed (overrides the preset)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Validate everything (config, data files, --out) before any work; errors print one line, exit 2."""
    from routelab._runs import RunFolderError
    from routelab.compare import ConfigError
    from routelab.data.corpus import DataError
    from routelab.models.io import ModelFolderError

    if args.threads < 1:
        return fail("train", f"--threads must be >= 1, got {args.threads}")
    from routelab.train import distributed

    if distributed.launched():  # torchrun: every rank validates the same way; rank 0 alone writes and prints
        distributed.init()
        args.quiet = args.quiet or not distributed.is_main()
    try:
        cfg = resolve_train(preset=args.preset, config_file=args.config, data_files=args.data, steps=args.steps,
                            seed=args.seed)
        if cfg["data"].get("source") == "files":
            from routelab.data.corpus import file_corpus

            file_corpus(cfg["data"]["files"])  # missing, unreadable, non-UTF-8 or empty files fail here
        check_run_dir(Path(args.out), cfg, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, DataError, RunFolderError, ModelFolderError) as exc:
        return fail("train", exc)
    if not args.quiet:
        print(f"routelab train: preset {args.preset}, router {cfg['variants'][0]['router']}, "
              f"{cfg['train']['steps']} steps → {args.out}/{MODEL_DIR}")
    try:
        summary = run_train(cfg, out_dir=Path(args.out), resume=args.resume, overwrite=args.overwrite,
                            quiet=args.quiet, threads=args.threads)
    except (ConfigError, DataError, RunFolderError, ModelFolderError) as exc:
        return fail("train", exc)
    if not distributed.is_main():
        return 0
    print(f"model: {summary['model_dir']} (val loss {summary['final']['val_loss']:.3f}, "
          f"ppl {summary['final']['val_perplexity']:.1f}, {summary['wall_seconds']:.0f} s)")
    return 0


def resolve_train(
    *,
    preset: str = "tiny",
    config_file: str | Path | None = None,
    data_files: list[str] | None = None,
    steps: int | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The validated configuration, in compare's form with one variant (named "model")."""
    from routelab.compare.config import ConfigError, load_preset, load_yaml, merge, resolve

    if preset not in TRAIN_PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(TRAIN_PRESETS)}")
    base_name, overrides = TRAIN_PRESETS[preset]
    cfg = merge(load_preset(base_name), overrides)
    router = dict(DEFAULT_ROUTER)
    if config_file is not None:
        user = load_yaml(config_file)
        if "variants" in user or "reference_k" in user:
            raise ConfigError(f"config file {config_file}: train takes data:, model:, train: (the router goes in "
                              "model: router, router_options, k_schedule), not variants/reference_k")
        model = user.get("model")
        if isinstance(model, dict):
            model = dict(model)
            for key in ("router", "router_options", "k_schedule"):
                if key in model:
                    router[key] = model.pop(key)
            if "vocab_size" in model:
                raise ConfigError("model.vocab_size is the tokenizer's: set data.vocab_size instead")
            user = {**user, "model": model}
        cfg = merge(cfg, user)
    cfg["variants"] = [{"name": "model", "router": router["router"], "options": router["router_options"] or {},
                        "k_schedule": router["k_schedule"]}]
    # compare's resolve does the rest (sections, overrides, every field, the router), before any work; a variant
    # whose router is not registered is dropped there, which leaves none: an error listing the registered ones.
    cfg, _ = resolve(base=cfg, data_files=data_files, steps=steps, seed=seed)
    if cfg["model"].get("kind", "lm") != "lm":
        raise ConfigError(f"model.kind={cfg['model']['kind']!r}: routelab train trains the autoregressive LM "
                          "(model.kind: lm); a diffusion LM trains in routelab compare (--preset diffusion)")
    return cfg


def train_layout() -> Any:
    """What `routelab train` writes under --out (routelab._runs deletes only these, in folders it marked)."""
    from routelab._runs import RunLayout
    from routelab.models.io import MODEL_FILES
    from routelab.train.checkpoint import CHECKPOINT_JSON

    return RunLayout("train", {"": (CONFIG_FILE, "metrics.jsonl", CHECKPOINT_JSON, "checkpoint-*.safetensors"),
                               MODEL_DIR: MODEL_FILES})


def check_run_dir(out: Path, cfg: dict[str, Any], *, resume: bool, overwrite: bool = False) -> None:
    """Raise (RunFolderError, ConfigError) unless `out` may take this run under routelab._runs' rules (a new, empty
    or earlier `routelab train` folder; another with `overwrite`); with `resume`, an earlier run must have the same
    configuration. Reads only."""
    import yaml

    from routelab._runs import check_out
    from routelab.compare.config import ConfigError
    from routelab.models.io import check_model_path

    check_out(out, train_layout(), overwrite=overwrite)
    check_model_path(out / MODEL_DIR)  # a user's file in it would stop save_model after training: refuse now
    path = out / CONFIG_FILE
    if resume and path.is_file():
        try:
            previous = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"--resume: {path} is unreadable ({exc}); start a new run in another folder") from None
        if previous != yaml.safe_load(yaml.safe_dump(cfg, sort_keys=False)):
            raise ConfigError(f"--resume: {out} holds a run with a different configuration (see {path}); "
                              "use the same options, or another --out")


def run_train(
    cfg: dict[str, Any],
    *,
    out_dir: Path,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    threads: int | None = None,
    cache: Path | None = None,
    on_step=None,
) -> dict[str, Any]:
    """Train the configuration's one variant in `out_dir` and write the model folder `out_dir/model`; returns a
    summary (model_dir, final metrics, wall_seconds). `on_step` is passed to the loop (tests stop a run with it)."""
    import torch
    import yaml

    from routelab._atomic import atomic_write_text
    from routelab._runs import claim_out
    from routelab.compare.config import model_config
    from routelab.compare.runner import json_safe, load_data
    from routelab.models.io import save_model
    from routelab.train import distributed
    from routelab.train.loop import TrainConfig, train

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        check_run_dir(out_dir, cfg, resume=resume, overwrite=overwrite)
        distributed.barrier()  # every rank has checked --out before rank 0 writes to it
        if not distributed.is_main():
            distributed.barrier()  # rank 0 builds (and caches) the tokenizer first
        data = load_data(cfg, cache=cache)
        if distributed.is_main():
            distributed.barrier()
        train_cfg = TrainConfig(**cfg["train"])
        data.check_windows(train_cfg.seq_len)
        variant = cfg["variants"][0]
        mc = model_config(cfg, variant, vocab_size=data.vocab_size)
        if distributed.is_main():
            claim_out(out_dir, train_layout(), resume=resume, overwrite=overwrite)  # fresh: the earlier run's files go
            atomic_write_text(out_dir / CONFIG_FILE, yaml.safe_dump(cfg, sort_keys=False))
        distributed.barrier()
        result = train(mc, train_cfg, data, out_dir=out_dir, resume=resume, progress=not quiet, desc="train",
                       on_step=on_step, log=lambda message: print(message, file=sys.stderr))
        final = {k: v for k, v in result.final.items() if k not in ("load_by_domain",)}
        final["val_perplexity"] = math.exp(final["val_loss"]) if final["val_loss"] < 700 else float("inf")
        training = {
            "config": copy.deepcopy(cfg),
            "data": {
                "domains": [{"name": d.name, "source": d.source, "train_tokens": d.train.numel(),
                             "val_tokens": d.val.numel()} for d in data.domains],
                "tokenizer_key": data.tokenizer_key,
            },
            "train_tokens": result.train_tokens,
            "train_seconds": result.train_seconds,
            "final": final,
        }
        model_dir = out_dir / MODEL_DIR
        if distributed.is_main():  # result.model is consolidated (every expert) on every rank
            model_dir = save_model(result.model, data.tokenizer, model_dir, training=json_safe(training))
        distributed.barrier()
        return {"model_dir": str(model_dir), "final": final, "wall_seconds": time.perf_counter() - started}
    finally:
        torch.set_num_threads(previous_threads)
