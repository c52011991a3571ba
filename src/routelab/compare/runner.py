"""Run a comparison: the same model, data, seed, batch order and token budget for every router variant.

Setup (data, tokenizer, validation of every variant) happens before anything trains; then each variant trains in
its own folder (`variants/<name>/`: metrics.jsonl, checkpoint, result.json, and the final model folder `model/`
that `routelab.load_model` reads), and the report is written from the
collected results. With `seeds` N > 1 (config field or `compare --seeds`), every variant trains once per seed
train.seed, train.seed+1, ... in `variants/<name>/seed-<s>/`, and the report adds t-intervals and paired
differences to the first variant (compare/stats.py). With `resume`, finished variants (or seeds) are read back and unfinished ones continue from their
checkpoints. Every result.json records the hash of its variant's full effective configuration and of the data's
contents (`variant_hash`); `resume` reuses a result only when the hash matches and the variant did not fail, and
retrains it otherwise. The output folder follows routelab._runs: a marker file names the run, only files the run can
prove it wrote are deleted (a run without `resume` deletes the earlier run's outputs first), no symbolic link below
--out is followed, and a non-empty folder that is not a routelab run is refused unless `overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from routelab._atomic import atomic_write_text
from routelab._runs import RunLayout, check_out, claim_out
from routelab.compare.config import ConfigError, load_yaml, model_config, model_kind
from routelab.data.corpus import DataError, Domain, builtin_corpus, file_corpus
from routelab.data.dataset import TokenData, tokenize_domains
from routelab.models.flops import reference_block_flops_per_token
from routelab.models.io import MODEL_FILES, save_model
from routelab.models.transformer import ModelConfig, MoETransformerLM
from routelab.train import distributed
from routelab.train.checkpoint import CHECKPOINT_JSON
from routelab.train.loop import TrainConfig, make_optimizer, steady_tokens_per_second, train

RESULTS_FORMAT = 1


def load_data(cfg: dict[str, Any], *, cache: Path | None = None) -> TokenData:
    """The configuration's domains, tokenized (tokenizer trained or read from the cache)."""
    data = cfg["data"]
    max_chars = data.get("max_chars", 0) or 0
    if data.get("source", "builtin") == "builtin":
        domains = builtin_corpus(max_chars=max_chars or 10**12)
    else:
        domains = file_corpus(data["files"])
        if max_chars:
            domains = [Domain(d.name, d.text[:max_chars], d.source) for d in domains]
    for d in domains:
        if not d.text.strip():
            raise DataError(f"domain {d.name!r} ({d.source}) is empty")
    return tokenize_domains(
        domains, vocab_size=data.get("vocab_size", 4096), val_fraction=data.get("val_fraction", 0.1), cache=cache
    )


def run_compare(
    cfg: dict[str, Any],
    *,
    out_dir: str | Path,
    resume: bool = False,
    quiet: bool = False,
    notes: list[str] | None = None,
    cache: Path | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every variant of the validated `cfg` and write the report folder; returns the results dict.

    `threads`: torch intra-op threads while it runs (restored afterwards); None keeps the current setting.
    `out_dir` follows routelab._runs' rules: a non-empty folder that is not a routelab run is refused unless
    `overwrite`; without `resume`, an earlier comparison's outputs in it are deleted first.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_compare(cfg, out_dir=out_dir, resume=resume, overwrite=overwrite, quiet=quiet, notes=notes,
                            cache=cache, log=log)
    finally:
        torch.set_num_threads(previous_threads)


def _run_compare(
    cfg: dict[str, Any], *, out_dir: str | Path, resume: bool, overwrite: bool, quiet: bool, notes: list[str] | None,
    cache: Path | None, log: Callable[[str], None],
) -> dict[str, Any]:
    main = distributed.is_main()  # under torchrun every rank trains every variant; rank 0 alone writes
    out = Path(out_dir)
    layout = compare_layout(cfg)
    check_out(out, layout, overwrite=overwrite)  # before the (slow) data loading
    if resume:
        check_resumable(out, cfg)
    started = time.perf_counter()
    if not main:
        distributed.barrier()  # rank 0 builds (and caches) the tokenizer first
    data = load_data(cfg, cache=cache)
    if main:
        distributed.barrier()
    train_cfg = TrainConfig(**cfg["train"])
    data.check_windows(train_cfg.seq_len)
    setup_seconds = time.perf_counter() - started
    if not quiet:
        how = "read from cache" if data.tokenizer_cached else "trained"
        sizes = ", ".join(f"{d.name} ({d.train.numel():,} train / {d.val.numel():,} val tokens)" for d in data.domains)
        log(f"data: {sizes}; "
            f"tokenizer {how} ({data.vocab_size} tokens, {setup_seconds:.1f} s)")
    distributed.barrier()  # every rank has checked --out before rank 0 claims it
    if main:
        claim_out(out, layout, resume=resume, overwrite=overwrite)  # without resume: the earlier run's outputs go
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    distributed.barrier()

    warm_up(cfg, data, train_cfg)
    seeds = seed_list(cfg)
    results = []
    n = len(cfg["variants"])
    overall = None
    if not quiet:
        from tqdm.auto import tqdm

        overall = tqdm(total=n * len(seeds), desc="compare", unit="run", position=0, dynamic_ncols=True)
    for i, variant in enumerate(cfg["variants"]):
        runs = []
        for seed in seeds:
            scfg = with_seed(cfg, seed)
            vdir = variant_dir(out, variant["name"], seed, multi=len(seeds) > 1)
            done_path = vdir / "result.json"
            vhash = variant_hash(scfg, variant, data.content_key)
            result = _reusable_result(done_path, vhash, log=log) if resume else None
            if result is None:
                desc = f"[{i + 1}/{n}] {variant['name']}" + (f" seed {seed}" if len(seeds) > 1 else "")
                result = run_variant(scfg, variant, data, TrainConfig(**scfg["train"]), out_dir=vdir, resume=resume,
                                     quiet=quiet, desc=desc, bar_position=1, log=log)
                result["variant_hash"] = vhash
                if len(seeds) > 1:
                    result["seed"] = seed
                if main:
                    atomic_write_text(done_path, json.dumps(result, indent=1))
            runs.append(result)
            if overall is not None:
                overall.update(1)
                overall.set_postfix_str(f"{variant['name']}: val ppl {result.get('val_perplexity', float('nan')):.1f}")
        results.append(runs[0] if len(seeds) == 1 else combine_seeds(runs, seeds))
    if overall is not None:
        overall.close()
    if len(seeds) > 1:
        add_paired_differences(results)

    summary = {
        "format": RESULTS_FORMAT,
        "config": cfg,
        "notes": list(notes or []),
        "data": {
            "domains": [
                {"name": d.name, "source": d.source, "train_tokens": d.train.numel(), "val_tokens": d.val.numel()}
                for d in data.domains
            ],
            "vocab_size": data.vocab_size,
            "tokenizer_key": data.tokenizer_key,
        },
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                        "threads": torch.get_num_threads()},
        "setup_seconds": setup_seconds,
        "seeds": seeds,
        "variants": results,
    }
    summary["wall_seconds"] = time.perf_counter() - started
    if main:
        atomic_write_text(out / "results.json", json.dumps(summary, indent=1))
        from routelab.compare.report import write_report  # matplotlib is imported only when a report is written

        write_report(summary, out)
    distributed.barrier()
    summary["wall_seconds"] = time.perf_counter() - started
    return summary


# What a comparison writes (routelab._runs deletes only these, and only in folders whose marker names a run).
REPORT_FILES = ("config.yaml", "results.json", "report.md", "val_loss.png", "expert_load.png",
                "experts_per_token.png", "domain_load.png", "quality_vs_compute.png")
VARIANT_FILES = ("result.json", "metrics.jsonl", CHECKPOINT_JSON, "checkpoint-*.safetensors")


def compare_layout(cfg: dict[str, Any]) -> RunLayout:
    """The folders and files of a comparison's --out folder (one folder per variant, or per variant and seed)."""
    folders = {"": REPORT_FILES, "variants": ()}
    seeds = seed_list(cfg)
    for v in cfg["variants"]:
        for seed in seeds:
            rel = variant_dir(Path(), v["name"], seed, multi=len(seeds) > 1).as_posix()
            folders[rel] = VARIANT_FILES
            if model_kind(cfg) == "lm":  # diffusion variants write no model folder
                folders[f"{rel}/model"] = MODEL_FILES
    return RunLayout("compare", folders)


def seed_list(cfg: dict[str, Any]) -> list[int]:
    """The seeds every variant trains with: train.seed, train.seed + 1, ..., `seeds` of them (default 1)."""
    first = cfg["train"].get("seed", 0)
    return [first + i for i in range(cfg.get("seeds", 1))]


def with_seed(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """`cfg` with train.seed = `seed` (the same object when it already is: one seed changes nothing)."""
    if cfg["train"].get("seed", 0) == seed:
        return cfg
    return {**cfg, "train": {**cfg["train"], "seed": seed}}


def variant_dir(out: Path, name: str, seed: int, *, multi: bool) -> Path:
    """variants/<name> for one seed (as before seeds existed), variants/<name>/seed-<seed> for several."""
    return out / "variants" / name / f"seed-{seed}" if multi else out / "variants" / name


# Scalars averaged over seeds in a multi-seed variant entry (the other top-level fields are the first seed's run).
SEED_MEANS = ("val_loss", "val_perplexity", "mean_experts_per_token", "active_expert_flops_vs_topk",
              "active_block_flops_vs_topk", "imbalance_max_over_mean", "imbalance_cv", "dropped_fraction", "train_tokens_per_second")


def combine_seeds(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """One variant's entry over several seeds: `runs` holds every seed's full result; the top-level scalars in
    SEED_MEANS are means over the seeds; loads, histograms and curves at top level are the first seed's;
    `seed_stats` holds the 95% t-intervals of validation perplexity and loss. A failed seed fails the variant."""
    from routelab.compare.stats import t_interval

    wall = sum(r.get("wall_seconds", 0.0) for r in runs)
    failed = [(s, r) for s, r in zip(seeds, runs) if "error" in r]
    base = {k: runs[0][k] for k in ("name", "router", "options", "k_schedule", "model") if k in runs[0]}
    if failed:
        seed, r = failed[0]
        return {**base, "error": f"seed {seed}: {r['error']}", "seeds": seeds, "runs": runs, "wall_seconds": wall}
    entry = {k: v for k, v in runs[0].items() if k not in ("variant_hash", "seed")}
    for key in SEED_MEANS:  # .get: a result stored by a routelab without a field (--resume) averages to nan
        values = [r.get(key, math.nan) for r in runs]
        entry[key] = _mean(values) if all(math.isfinite(x) for x in values) else float("nan")
    entry.update({
        "wall_seconds": wall,
        "seeds": seeds,
        "curves_from_seed": seeds[0],
        "seed_stats": {
            "interval": "two-sided 95% Student-t over seeds",
            "val_perplexity": t_interval([r["val_perplexity"] for r in runs]),
            "val_loss": t_interval([r["val_loss"] for r in runs]),
            "active_expert_flops_vs_topk": t_interval([r["active_expert_flops_vs_topk"] for r in runs]),
            "active_block_flops_vs_topk": t_interval([r.get("active_block_flops_vs_topk", math.nan) for r in runs]),
        },
        "runs": runs,
    })
    return entry


def add_paired_differences(results: list[dict[str, Any]]) -> None:
    """Give every finished variant `paired_vs_reference`: the t-interval of its per-seed validation-loss difference
    to the reference (the first variant listed), with `distinguishable` (interval excludes 0)."""
    from routelab.compare.stats import paired_difference

    reference = results[0]
    if "error" in reference:
        return
    ref_losses = [r["val_loss"] for r in reference["runs"]]
    for v in results:
        if "error" not in v:
            v["paired_vs_reference"] = {"reference": reference["name"], "metric": "val_loss (nats/token)",
                                        **paired_difference([r["val_loss"] for r in v["runs"]], ref_losses)}


def check_resumable(out: Path, cfg: dict[str, Any]) -> None:
    """For --resume: raise a ConfigError unless `out` holds no configuration yet or the same one as `cfg`."""
    path = out / "config.yaml"
    if not path.is_file():
        return
    try:
        previous = load_yaml(path)  # bounded: a regular file, a size limit, aliases expanded within a limit
    except ConfigError as exc:
        raise ConfigError(f"--resume: cannot read {path} ({exc}); fix or delete it, or run without --resume") \
            from None
    if previous != yaml.safe_load(yaml.safe_dump(cfg, sort_keys=False)):
        raise ConfigError(f"--resume: {out} holds a comparison with a different configuration "
                          f"(see {path}); use another --out or the same options")


def variant_hash(cfg: dict[str, Any], variant: dict[str, Any], data_key: str) -> str:
    """A digest of everything that determines one variant's result: the data's contents (`TokenData.content_key`:
    texts and tokenizer, not the file names), data options, model, train, reference_k, variant."""
    effective = {"data": cfg.get("data"), "data_key": data_key, "model": cfg.get("model"), "train": cfg.get("train"),
                 "reference_k": cfg.get("reference_k", 2), "variant": variant}
    return hashlib.sha256(json.dumps(effective, sort_keys=True, default=repr).encode()).hexdigest()


def _reusable_result(path: Path, vhash: str, *, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The finished result at `path` when it belongs to this configuration and did not fail; else None."""
    if not path.is_file():
        return None
    name = path.parent.name
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log(f"note: {name}: {path} cannot be read ({type(exc).__name__}); retraining it")
        return None
    if not isinstance(result, dict) or result.get("variant_hash") != vhash:
        log(f"note: {name}: the stored result was computed with a different configuration; retraining it")
        return None
    if "error" in result:
        log(f"note: {name}: the previous attempt failed ({result['error']}); running it again")
        return None
    return result


def run_variant(
    cfg: dict[str, Any], variant: dict[str, Any], data: TokenData, train_cfg: TrainConfig, *,
    out_dir: Path, resume: bool, quiet: bool, desc: str, bar_position: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train one variant; a failure is recorded (with its message) instead of stopping the comparison."""
    mc = model_config(cfg, variant, vocab_size=data.vocab_size)
    base = {"name": variant["name"], "router": variant["router"], "options": variant.get("options") or {},
            "k_schedule": variant.get("k_schedule")}
    if variant.get("model"):
        base["model"] = variant["model"]
    if model_kind(cfg) == "diffusion_lm":
        return run_diffusion_variant(cfg, variant, data, train_cfg, base=base, quiet=quiet, desc=desc,
                                     bar_position=bar_position)
    t0 = time.perf_counter()
    try:
        run = train(mc, train_cfg, data, out_dir=out_dir, resume=resume, progress=not quiet, desc=desc,
                    bar_position=bar_position, log=log)
        if distributed.is_main():  # under torchrun run.model is consolidated on every rank; rank 0 writes it
            save_model(run.model, data.tokenizer, out_dir / "model", training=json_safe({  # variants/<name>/model
                "source": "routelab compare", "variant": base, "train": cfg["train"], "data": cfg["data"],
                "final": {"val_loss": run.final["val_loss"], "val_loss_by_domain": run.final["val_loss_by_domain"]},
            }))
    except Exception as exc:  # noqa: BLE001 — one broken router must not cost the others' results
        distributed.barrier()
        return {**base, "error": f"{type(exc).__name__}: {exc}", "wall_seconds": time.perf_counter() - t0}
    distributed.barrier()
    wall = time.perf_counter() - t0
    model, final = run.model, run.final
    model.eval()
    causal_eval = model.causal
    model.train()
    causal_train = model.causal
    reference_k = cfg.get("reference_k", 2)
    return {
        **base,
        "per_layer_options": model.per_layer_options,
        "causal": bool(causal_eval and causal_train),
        "causal_eval": bool(causal_eval),
        "causal_train": bool(causal_train),
        "params": sum(p.numel() for p in model.parameters()),
        **evaluation_fields(final),
        # routed-expert FLOPs per token and MoE layer (widths and Chain-of-Experts repeats counted) ÷ top-k's
        "active_expert_flops_vs_topk": _mean(final["active_expert_flops_by_layer"]) / reference_k,
        "active_expert_flops_by_layer": final["active_expert_flops_by_layer"],
        **block_flops_fields(final, mc, reference_k),
        "train_tokens": run.train_tokens,
        "train_seconds": run.train_seconds,
        "train_tokens_per_second": steady_tokens_per_second(run.train_curve, train_cfg.batch_size * train_cfg.seq_len),
        "wall_seconds": wall,
        "train_curve": [{k: r[k] for k in ("step", "loss", "lm_loss", "aux_loss", "lr", "seconds") if k in r}
                        for r in run.train_curve],
        "val_curve": [{"step": r["step"], "val_loss": r["val_loss"], "by_domain": r["by_domain"]}
                      for r in run.val_curve],
    }


def run_diffusion_variant(
    cfg: dict[str, Any], variant: dict[str, Any], data: TokenData, train_cfg: TrainConfig, *, base: dict[str, Any],
    quiet: bool, desc: str, bar_position: int,
) -> dict[str, Any]:
    """One variant of a `model.kind: diffusion_lm` comparison (`train.diffusion_lm`): the same result fields as an
    autoregressive variant, the loss being the NELBO per token (val_perplexity = exp(NELBO), an upper bound), plus
    `flops_by_t` (active expert FLOPs vs top-k per bin of diffusion time t). No model folder is written."""
    from routelab.train.diffusion_lm import train_diffusion_lm

    mc = model_config(cfg, variant, vocab_size=data.vocab_size)
    t0 = time.perf_counter()
    try:
        run = train_diffusion_lm(mc, train_cfg, data, progress=not quiet, desc=desc, bar_position=bar_position)
    except Exception as exc:  # noqa: BLE001 — one broken router must not cost the others' results
        return {**base, "error": f"{type(exc).__name__}: {exc}", "wall_seconds": time.perf_counter() - t0}
    model, final = run["model"], run["final"]
    causal = bool(model.net.causal)
    fields = evaluation_fields(final)
    reference_k = cfg.get("reference_k", 2)
    return {
        **base,
        "model_kind": "diffusion_lm",
        "per_layer_options": model.per_layer_options,
        # The routers' own causality, recorded as for an LM; the report does not flag it here: attention is
        # bidirectional and nothing is generated left to right, so a non-causal router leaks nothing.
        "causal": causal, "causal_eval": causal, "causal_train": causal,
        "comparable": True,
        "params": sum(p.numel() for p in model.parameters()),
        **fields,
        "active_expert_flops_vs_topk": fields["mean_experts_per_token"] / reference_k,
        **block_flops_fields(final, mc, reference_k),
        "flops_by_t": [{**b, "flops_vs_topk": b["mean"] / reference_k} for b in final["experts_per_token_by_t"]],
        "train_tokens": run["train_tokens"],
        "train_seconds": run["train_seconds"],
        "train_tokens_per_second": steady_tokens_per_second(run["train_curve"],
                                                            train_cfg.batch_size * train_cfg.seq_len),
        "wall_seconds": time.perf_counter() - t0,
        "train_curve": run["train_curve"],
        "val_curve": [{"step": r["step"], "val_loss": r["val_loss"], "by_domain": r["by_domain"]}
                      for r in run["val_curve"]],
    }


def block_flops_fields(final: dict[str, Any], mc: ModelConfig, reference_k: int) -> dict[str, Any]:
    """Block FLOPs per token actually spent (attention projections and feed-forward of the blocks a token ran,
    routed experts by width and repeat; `models.flops`) ÷ top-k's reference, the share of tokens each block
    processed (below 1 only on Mixture-of-Depths blocks) and each Mixture-of-Depths predictor's agreement with
    top-C membership on the validation set."""
    return {
        "active_block_flops_vs_topk": final["block_flops_per_token"] / reference_block_flops_per_token(mc, reference_k),
        "processed_fraction_by_block": final["processed_fraction_by_block"],
        "mod_blocks": mc.mod_block_indices(),
        "mod_predictor_accuracy": final["mod_predictor_accuracy"],
    }


def evaluation_fields(final: dict[str, Any]) -> dict[str, Any]:
    """The result fields an autoregressive and a diffusion variant share, from the final evaluation's statistics."""
    return {
        "val_loss": final["val_loss"],
        "val_perplexity": math.exp(final["val_loss"]) if final["val_loss"] < 700 else float("inf"),
        "val_loss_by_domain": final["val_loss_by_domain"],
        "mean_experts_per_token": sum(final["experts_per_token_by_layer"]) / len(final["experts_per_token_by_layer"]),
        "experts_per_token_by_layer": final["experts_per_token_by_layer"],
        "imbalance_max_over_mean": _mean(final["imbalance_max_over_mean"]),
        "imbalance_cv": _mean(final["imbalance_cv"]),
        "imbalance_max_over_mean_by_layer": final["imbalance_max_over_mean"],
        "imbalance_cv_by_layer": final["imbalance_cv"],
        "dropped_fraction": final["dropped_fraction"],
        "load": final["load"],
        "load_by_domain": final["load_by_domain"],
        "experts_per_token_histogram": final["experts_per_token_histogram"],
    }


def warm_up(cfg: dict[str, Any], data: TokenData, train_cfg: TrainConfig, steps: int = 2) -> None:
    """A few untimed steps of a throwaway model, so that one-off process costs (thread pools, allocator, kernel
    selection) are not charged to whichever variant happens to run first. The global RNG is restored afterwards."""
    rng = torch.get_rng_state()
    try:
        model = MoETransformerLM(model_config(cfg, cfg["variants"][0], vocab_size=data.vocab_size))
        optimizer = make_optimizer(model, train_cfg)
        for step in range(steps):
            inputs, targets = data.batch(
                step, batch_size=train_cfg.batch_size, seq_len=train_cfg.seq_len, seed=train_cfg.seed
            )
            model(inputs, targets, step=step)[1].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    except Exception:  # noqa: BLE001 — the variant's own run reports any error
        pass
    finally:
        torch.set_rng_state(rng)


def json_safe(value: Any) -> Any:
    """JSON-ready: non-finite floats become null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")
