"""The training loop: one straight line — setup → (resume) → loop {schedule, step, update_routers, log, evaluate,
checkpoint} → final evaluation with routing statistics.

Determinism: the model is initialised under `torch.manual_seed(seed)`, batches are a function of (seed, step) only
(see `TokenData.batch`), and checkpoints carry the RNG states, so two runs with the same seed on the same machine
give identical loss curves, and a run resumed from a checkpoint continues exactly as if it had not stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from routelab._atomic import atomic_write_text
from routelab._runs import remove_stale_temporaries
from routelab._checks import check_int, short_repr
from routelab.data.dataset import TokenData
from routelab.layers.depth import MixtureOfDepths
from routelab.layers.moe import total_aux_loss
from routelab.models.flops import block_flops_per_token
from routelab.models.transformer import ModelConfig, MoETransformerLM
from routelab.routing.base import update_routers
from routelab.train import distributed
from routelab.train.checkpoint import (
    CHECKPOINT_JSON,
    CheckpointError,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from routelab.train.memory import check_training_memory


@dataclass(frozen=True)
class TrainConfig:
    """steps: optimizer steps; batch_size × seq_len tokens per step; lr peaks after `warmup` steps and decays by
    cosine to lr·min_lr_ratio; eval every `eval_every` steps on `eval_windows` windows per domain; checkpoint every
    `checkpoint_every` steps (0: only at the end)."""

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_windows: int = 16
    eval_batch_size: int = 16
    checkpoint_every: int = 0
    seed: int = 0

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_windows", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {short_repr(value)}")
        for name in ("warmup", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"train.{name} must be an integer >= 0, got {short_repr(value)}")
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_windows", "eval_batch_size", "warmup",
                     "checkpoint_every", "seed"):
            check_int(f"train.{name}", getattr(self, name), 0)  # the int64 bound
        for name in ("lr", "weight_decay", "grad_clip", "min_lr_ratio", "beta1", "beta2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"train.{name} must be a finite number >= 0, got {short_repr(value)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr!r}")
        for name in ("beta1", "beta2"):
            if not getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to lr·min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (dim ≥ 2: projections, expert banks, embeddings), none on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@dataclass
class TrainResult:
    model: MoETransformerLM
    train_curve: list[dict[str, float]]  # per step: step, lr, loss, lm_loss, aux_loss
    val_curve: list[dict[str, Any]]  # per evaluation: step, val_loss, by_domain
    final: dict[str, Any]  # evaluate(..., stats=True) at the end
    train_seconds: float
    train_tokens: int


def train(
    model_config: ModelConfig,
    cfg: TrainConfig,
    data: TokenData,
    *,
    out_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
    bar_position: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train `MoETransformerLM(model_config)` on `data`; with `out_dir`, write metrics.jsonl and checkpoints there.

    With `resume`, a checkpoint in `out_dir` is continued only when it was written for the same run (same
    `run_config_hash`: model config, train config and data); otherwise the run starts from step 0 and `log` says why.
    `on_step(step, record)` is called after each optimizer step (tests use it to stop a run midway).
    """
    cfg.validate()
    data.check_windows(cfg.seq_len)
    model_config.validate()
    check_training_memory(model_config, cfg)  # absurd sizes are refused before anything allocates them
    run = distributed.setup()  # None in one process; under torchrun: DP for replicated parameters, EP for experts
    if run is not None and cfg.batch_size % run.world_size:
        raise ValueError(f"train.batch_size={cfg.batch_size} must be divisible by the {run.world_size} processes")
    torch.manual_seed(cfg.seed)
    model = MoETransformerLM(model_config)
    optimizer = make_optimizer(model, cfg)
    val_sets = data.val_windows(seq_len=cfg.seq_len, windows_per_domain=cfg.eval_windows)
    train_curve: list[dict[str, float]] = []
    val_curve: list[dict[str, Any]] = []
    start, train_seconds = 0, 0.0
    metrics_path = None if out_dir is None else Path(out_dir) / "metrics.jsonl"
    metrics_out = metrics_path if distributed.is_main() else None  # under torchrun only rank 0 writes
    config_hash = run_config_hash(model_config, cfg, data)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            remove_stale_temporaries(out_dir)  # left by a kill between writing a file and renaming it
        if resume and has_checkpoint(Path(out_dir)):
            saved = checkpoint_config_hash(Path(out_dir))
            if saved == config_hash:
                try:
                    meta = load_checkpoint(Path(out_dir), model=model, optimizer=optimizer)
                    start, train_seconds = meta["step"], meta["extra"]["train_seconds"]
                    train_curve, val_curve = _read_metrics(metrics_path, upto=start)
                except (CheckpointError, MetricsError, KeyError, TypeError) as exc:
                    # a corrupt file must not fail the run on every resume: it is treated as absent
                    log(f"note: {desc}: {exc}; treating the checkpoint as absent and training from step 0")
                    torch.manual_seed(cfg.seed)
                    model = MoETransformerLM(model_config)
                    optimizer = make_optimizer(model, cfg)
                    start, train_seconds, train_curve, val_curve = 0, 0.0, [], []
            else:
                log(f"note: {desc}: the checkpoint in {out_dir} was written for a different configuration; "
                    f"training from step 0")
        _write_metrics(metrics_out, train_curve, val_curve)  # drops records after the checkpoint's step
    if run is not None:  # after a resume, which loaded the full (consolidated) checkpoint
        optimizer = run.shard(model, optimizer, lambda m: make_optimizer(m, cfg))

    if start == 0 and not val_curve:  # the loss before training, so every curve starts from the same point
        val_curve.append(_eval_record(model, val_sets, cfg, step=0))
        _append_metrics(metrics_out, val_curve[-1:])
    saved_step = start if start else None  # the step of the checkpoint on disk, for the message on a NaN loss
    bar = _progress(cfg.steps, start, desc, progress and distributed.is_main(), bar_position)
    model.train()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = data.batch(step, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed)
        if run is not None:
            inputs, targets = run.rank_batch(inputs, targets)
        try:
            _, loss = model(inputs, targets, step=step)
            # Under torchrun the global loss: a non-finite loss on any rank stops every rank at the same step.
            loss_value = (loss if run is None else run.mean(loss)).item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"the training loss is {loss_value}")
        except FloatingPointError as exc:  # stop before the step, so weights and router state stay as they were
            raise FloatingPointError(f"{desc}: non-finite values at step {step + 1} ({exc}); training stopped before "
                                     f"applying the step; {_last_good(out_dir, saved_step)}") from None
        aux = total_aux_loss(model).detach()
        optimizer.zero_grad(set_to_none=True)
        if run is None:
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        else:
            (loss / run.world_size).backward()  # this rank's share of the global loss
            run.sync_grads(model)
            if cfg.grad_clip > 0:
                run.clip_grad_norm(model, cfg.grad_clip)
            aux = run.mean(aux)
        optimizer.step()
        update_routers(model)
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        record = {"kind": "train", "step": step + 1, "lr": lr, "loss": loss_value,
                  "lm_loss": loss_value - aux.item(), "aux_loss": aux.item(), "seconds": seconds}
        train_curve.append(record)
        new_records = [record]
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            val_curve.append(_eval_record(model, val_sets, cfg, step=done))
            new_records.append(val_curve[-1])
        _append_metrics(metrics_out, new_records)
        if bar is not None:
            bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{val_curve[-1]['val_loss']:.3f}" if val_curve else "-")
            bar.update(1)
        if out_dir is not None and (cfg.checkpoint_every and done % cfg.checkpoint_every == 0 or done == cfg.steps):
            model_state, optimizer_state = run.full_state(model, optimizer) if run is not None else (None, None)
            if distributed.is_main():
                save_checkpoint(Path(out_dir), model=model, optimizer=optimizer, step=done,
                                extra={"train_seconds": train_seconds, "train_config": asdict(cfg),
                                       "config_hash": config_hash},
                                model_state=model_state, optimizer_state=optimizer_state)
            distributed.barrier()
            saved_step = done
        if on_step is not None:
            on_step(done, record)
    if bar is not None:
        bar.close()
    final = evaluate(model, val_sets, batch_size=cfg.eval_batch_size, step=cfg.steps, stats=True)
    if run is not None:  # hand back the consolidated model: every expert, loadable in one process
        model = run.consolidated(model, MoETransformerLM(model_config))
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    return TrainResult(model, train_curve, val_curve, final, train_seconds, tokens)


@torch.no_grad()
def evaluate(
    model: MoETransformerLM,
    val_sets: list[tuple[str, torch.Tensor, torch.Tensor]],
    *,
    batch_size: int,
    step: int | None = None,
    stats: bool = False,
) -> dict[str, Any]:
    """Mean next-token cross-entropy on the validation windows (overall: mean over all tokens, and per domain).

    With `stats`, also routing statistics of the MoE layers over the same forwards (eval mode, no router updates):
    load [layer][expert] and per domain, imbalance max/mean and coefficient of variation per layer (mean over the
    eval batches), the experts-per-token histogram, dropped assignments and mean experts per token per layer.
    """
    was_training = model.training
    model.eval()
    routing = RoutingStats(model)
    total_loss, total_tokens = 0.0, 0
    by_domain: dict[str, float] = {}
    for name, inputs, targets in val_sets:
        dom_loss, dom_tokens = 0.0, 0
        for i in range(0, inputs.shape[0], batch_size):
            x, y = inputs[i : i + batch_size], targets[i : i + batch_size]
            logits, _ = model(x, step=step)
            logits_NV = logits.reshape(-1, logits.shape[-1]).float()
            loss = torch.nn.functional.cross_entropy(logits_NV, y.reshape(-1), reduction="sum")
            dom_loss += loss.item()
            dom_tokens += y.numel()
            if stats:
                routing.add(name, x.numel())
        by_domain[name] = dom_loss / dom_tokens
        total_loss += dom_loss
        total_tokens += dom_tokens
    if was_training:
        model.train()
    out: dict[str, Any] = {"step": step, "val_loss": total_loss / total_tokens, "val_loss_by_domain": by_domain}
    if stats:
        out.update(routing.result())
    return out


class RoutingStats:
    """Routing statistics of a model's MoE layers summed over evaluation forwards (one `add` after each forward,
    reading every layer's `last_decision`): load per layer and expert (overall and per domain), per-batch imbalance
    max/mean and CV, experts per token, active expert FLOPs (widths and repeats counted), histogram, dropped share,
    and the share of tokens each Mixture-of-Depths block processed, with the block FLOPs per token they add up to
    (`models.flops`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.config = model.config
        self.mods = [m for m in model.modules() if isinstance(m, MixtureOfDepths)]  # one per routed block, in order
        self.mod_processed = torch.zeros(len(self.mods), dtype=torch.float64)
        self.mod_tokens = torch.zeros(len(self.mods), dtype=torch.float64)
        self.mod_agreement = torch.zeros(len(self.mods), dtype=torch.float64)
        self.layers = model.moe_layers
        E = self.layers[0].router.num_experts if self.layers else model.config.num_experts  # ReXMoE routes over more
        n_layers = len(self.layers)
        self.load_by_domain: dict[str, torch.Tensor] = {}
        self.zeros_LE = lambda: torch.zeros(n_layers, E, dtype=torch.float64)
        self.max_over_mean = torch.zeros(n_layers, dtype=torch.float64)
        self.cv = torch.zeros(n_layers, dtype=torch.float64)
        self.assignments = torch.zeros(n_layers, dtype=torch.float64)
        self.expert_units = torch.zeros(n_layers, dtype=torch.float64)  # assignments weighted by width ÷ d_ff
        self.dropped = torch.zeros(n_layers, dtype=torch.float64)
        self.ept_hist: dict[int, int] = {}
        self.n_batches, self.routed_tokens = 0, 0

    def add(self, domain: str, tokens: int) -> None:
        """Count the last forward (of `tokens` tokens, from `domain`)."""
        dom_load = self.load_by_domain.setdefault(domain, self.zeros_LE())
        self.n_batches += 1
        self.routed_tokens += tokens
        for j, mod in enumerate(self.mods):
            self.mod_processed[j] += mod.last_processed
            self.mod_tokens[j] += mod.last_tokens
            self.mod_agreement[j] += math.nan if mod.last_agreement is None else mod.last_agreement
        for j, layer in enumerate(self.layers):
            dec = layer.last_decision
            lj = dec.expert_load().double()
            dom_load[j] += lj
            mean = lj.mean()
            self.max_over_mean[j] += (lj.max() / mean).item() if mean > 0 else float("nan")
            self.cv[j] += (lj.std(unbiased=False) / mean).item() if mean > 0 else float("nan")
            self.assignments[j] += dec.num_assignments
            self.expert_units[j] += active_expert_units(layer, dec)
            self.dropped[j] += dec.num_dropped
            for count, n in zip(*torch.unique(dec.experts_per_token(), return_counts=True)):
                self.ept_hist[int(count)] = self.ept_hist.get(int(count), 0) + int(n)

    def result(self) -> dict[str, Any]:
        load = sum(self.load_by_domain.values(), self.zeros_LE())
        processed_by_block = [1.0] * self.config.n_layers
        for i, done, seen in zip(self.config.mod_block_indices(), self.mod_processed, self.mod_tokens):
            processed_by_block[i] = (done / seen).item()
        units = (self.expert_units / self.routed_tokens).tolist()
        return {
            "load": load.tolist(),
            "load_by_domain": {k: v.tolist() for k, v in self.load_by_domain.items()},
            "imbalance_max_over_mean": (self.max_over_mean / self.n_batches).tolist(),
            "imbalance_cv": (self.cv / self.n_batches).tolist(),
            "experts_per_token_by_layer": (self.assignments / self.routed_tokens).tolist(),
            "active_expert_flops_by_layer": units,
            "processed_fraction_by_block": processed_by_block,
            # per Mixture-of-Depths block: how often its causal predictor agreed with top-C membership
            "mod_predictor_accuracy": (self.mod_agreement / self.mod_tokens).tolist(),
            "block_flops_per_token": block_flops_per_token(self.config, processed_by_block=processed_by_block,
                                                           expert_units_by_moe_layer=units),
            "experts_per_token_histogram": {str(k): v for k, v in sorted(self.ept_hist.items())},
            "dropped_fraction": (self.dropped.sum() / max(1.0, (self.assignments + self.dropped).sum())).item(),
            "routed_tokens_per_layer": self.routed_tokens,
        }


def active_expert_units(layer: torch.nn.Module, decision: Any) -> float:
    """Routed-expert FLOPs of one decision in units of one d_ff-wide expert on one token: the number of assignments,
    each weighted by its expert's width ÷ d_ff when the bank's experts differ in width (`relative_widths()`).
    A Chain-of-Experts layer's decision holds every iteration's assignments, so repeats are counted."""
    widths = getattr(layer.experts, "relative_widths", None)
    if widths is None:
        return float(decision.num_assignments)
    return float(widths()[decision.expert_index].sum())


def _eval_record(
    model: MoETransformerLM, val_sets: list[tuple[str, torch.Tensor, torch.Tensor]], cfg: TrainConfig, *, step: int
) -> dict[str, Any]:
    """The metrics.jsonl record of an evaluation at `step` (no routing statistics)."""
    ev = evaluate(model, val_sets, batch_size=cfg.eval_batch_size, step=step)
    return {"kind": "eval", "step": step, "val_loss": ev["val_loss"], "by_domain": ev["val_loss_by_domain"]}


def _progress(total: int, start: int, desc: str, enabled: bool, position: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True, position=position,
                leave=position == 0)


def steady_tokens_per_second(train_curve: list[dict[str, float]], tokens_per_step: int) -> float:
    """Training tokens per second over the steps after the first tenth (at most 10 steps are skipped): the first
    steps of a fresh model pay one-off costs (allocator, kernel selection) that are not the router's."""
    skip = min(10, len(train_curve) // 10)
    timed = [r["seconds"] for r in train_curve[skip:] if "seconds" in r]
    return tokens_per_step * len(timed) / sum(timed) if timed and sum(timed) > 0 else float("nan")


def run_config_hash(model_config: ModelConfig, cfg: TrainConfig, data: TokenData) -> str:
    """A digest of everything that determines a run: model config, train config and the data (tokenizer key, the
    hash of the data's contents and split sizes). A checkpoint is continued only by a run with the same digest."""
    data_id = {"tokenizer_key": getattr(data, "tokenizer_key", None), "content_key": getattr(data, "content_key", None),
               "domains": [[d.name, d.train.numel(), d.val.numel()] for d in data.domains]}
    blob = json.dumps({"model": model_config.to_dict(), "train": asdict(cfg), "data": data_id}, sort_keys=True,
                      default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()


def _last_good(out_dir: Path | None, saved_step: int | None) -> str:
    if out_dir is None:
        return "no out_dir, so no checkpoint was written"
    if saved_step is None:
        return f"no checkpoint of this run was written to {out_dir} yet"
    return f"the last good checkpoint, step {saved_step}, is in {out_dir}"


def checkpoint_config_hash(folder: Path) -> str | None:
    """The `config_hash` recorded in `folder`'s checkpoint (None when absent or unreadable)."""
    try:
        meta = json.loads((Path(folder) / CHECKPOINT_JSON).read_text())
        return meta.get("extra", {}).get("config_hash")
    except (OSError, ValueError, AttributeError):
        return None


def _append_metrics(path: Path | None, records: list[dict]) -> None:
    """Append records to metrics.jsonl. A kill mid-append can leave a partial last line: `_read_metrics` skips it,
    and a resume rewrites the file atomically from the checkpoint's step."""
    if path is None:
        return
    with path.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def _write_metrics(path: Path | None, train_curve: list, val_curve: list) -> None:
    """Rewrite metrics.jsonl atomically, in step order (at the start of a run or resume)."""
    if path is None:
        return
    records = sorted(train_curve + val_curve, key=lambda r: (r["step"], r["kind"] == "eval"))
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


class MetricsError(ValueError):
    """A metrics.jsonl that cannot be read back; the message names the file and the line."""


def _read_metrics(path: Path, *, upto: int) -> tuple[list, list]:
    train_curve, val_curve = [], []
    if not path.is_file():
        return train_curve, val_curve
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise MetricsError(f"metrics file {path} cannot be read ({exc})") from None
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            step, kind = record["step"], record["kind"]
            if not isinstance(step, int) or kind not in ("train", "eval"):
                raise ValueError("no step/kind")
        except (ValueError, KeyError, TypeError):
            if i == len(lines) - 1:  # a record cut short by a kill mid-append (files from older versions)
                break
            raise MetricsError(f"metrics file {path} has a corrupt record on line {i + 1}") from None
        if step <= upto:
            (train_curve if kind == "train" else val_curve).append(record)
    return train_curve, val_curve
