"""Training and evaluation of the masked-diffusion LM (`models.diffusion_lm`), in one process.

The same straight line as `train.loop` — seeded init, batches a function of (seed, step), `lr_at` schedule, AdamW
groups, gradient clipping, `update_routers` once per step — with the diffusion objective. Times and masks of step s
come from a generator seeded by (seed, s), so two runs with the same seed give identical curves. There is no
checkpoint/resume or torchrun path here (a comparison's `--resume` reuses finished variants, and retrains an
unfinished diffusion variant from step 0).

Evaluation (`evaluate_nelbo`): the NELBO per token on the validation windows, with times on an even grid over
(0, 1] (window i of n gets t = (i + ½)/n) and masks from a fixed seed, so every variant is scored on the same noised
inputs; exp(NELBO) is an upper bound on perplexity. With `stats`, routing statistics per MoE layer and the active
expert FLOPs as a function of t: per sequence, the mean experts per token over the MoE layers (an expert's FLOPs
per token are the same for every expert, so this is the active expert FLOPs in units of one expert), averaged within
`T_BINS` bins of t.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from routelab.data.dataset import TokenData
from routelab.layers.moe import total_aux_loss
from routelab.models.diffusion_lm import MaskedDiffusionLM, mask_tokens, nelbo_per_token
from routelab.models.transformer import ModelConfig
from routelab.routing.base import update_routers
from routelab.train.loop import RoutingStats, TrainConfig, lr_at, make_optimizer
from routelab.train.memory import check_training_memory

T_BINS = 5
EVAL_MASK_SEED = 1234


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


def train_diffusion_lm(
    model_config: ModelConfig,
    cfg: TrainConfig,
    data: TokenData,
    *,
    progress: bool = False,
    desc: str = "train",
    bar_position: int = 0,
) -> dict[str, Any]:
    """Train `MaskedDiffusionLM(model_config)`; returns {model, train_curve, val_curve, final, train_seconds,
    train_tokens}, `final` being `evaluate_nelbo(..., stats=True)` after the last step."""
    cfg.validate()
    data.check_windows(cfg.seq_len)
    check_training_memory(model_config, cfg)
    torch.manual_seed(cfg.seed)
    model = MaskedDiffusionLM(model_config)
    optimizer = make_optimizer(model, cfg)
    val_sets = data.val_windows(seq_len=cfg.seq_len, windows_per_domain=cfg.eval_windows)
    train_curve: list[dict[str, float]] = []
    val_curve = [_eval_record(model, val_sets, cfg, step=0)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=desc, unit="step", dynamic_ncols=True, position=bar_position,
                   leave=bar_position == 0)
    train_seconds = 0.0
    model.train()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x0_BL, _ = data.batch(step, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed)
        loss, nelbo = model(x0_BL, generator=step_generator(cfg.seed, step), step=step)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"{desc}: the training loss is {loss_value} at step {step + 1}")
        aux = total_aux_loss(model).detach()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        update_routers(model)
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        train_curve.append({"step": step + 1, "lr": lr, "loss": loss_value, "lm_loss": nelbo.item(),
                            "aux_loss": aux.item(), "seconds": seconds})
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            val_curve.append(_eval_record(model, val_sets, cfg, step=done))
        if bar is not None:
            bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{val_curve[-1]['val_loss']:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    final = evaluate_nelbo(model, val_sets, batch_size=cfg.eval_batch_size, step=cfg.steps, stats=True)
    return {"model": model, "train_curve": train_curve, "val_curve": val_curve, "final": final,
            "train_seconds": train_seconds, "train_tokens": cfg.steps * cfg.batch_size * cfg.seq_len}


def eval_times(n: int) -> torch.Tensor:
    """The validation times: an even grid (i + ½)/n over (0, 1)."""
    return (torch.arange(n, dtype=torch.float64) + 0.5).div(n).float()


@torch.no_grad()
def evaluate_nelbo(
    model: MaskedDiffusionLM,
    val_sets: list[tuple[str, torch.Tensor, torch.Tensor]],
    *,
    batch_size: int,
    step: int | None = None,
    stats: bool = False,
) -> dict[str, Any]:
    """NELBO per token on the validation windows (overall and per domain); with `stats`, routing statistics in the
    shape `train.loop.evaluate` gives them plus `flops_by_t` (see the module docstring)."""
    was_training = model.training
    model.eval()
    layers = model.moe_layers
    n_layers = len(layers)
    routing = RoutingStats(model)
    total, total_windows, by_domain = 0.0, 0, {}
    t_all, ept_all = [], []
    generator = torch.Generator().manual_seed(EVAL_MASK_SEED)
    for name, inputs, _ in val_sets:
        t_N = eval_times(inputs.shape[0])
        dom_sum = 0.0
        for i in range(0, inputs.shape[0], batch_size):
            x0_BL, t_B = inputs[i : i + batch_size], t_N[i : i + batch_size]
            xt_BL, masked_BL = mask_tokens(x0_BL, t_B, model.mask_id, generator)
            logits = model.logits(xt_BL, t_B, step=step)
            dom_sum += nelbo_per_token(logits, x0_BL, masked_BL, t_B).item() * x0_BL.shape[0]
            if stats:
                B, L = x0_BL.shape
                routing.add(name, B * L)
                ept_B = torch.zeros(B, dtype=torch.float64)
                for layer in layers:  # per sequence, for the FLOPs-by-t table
                    ept_B += layer.last_decision.experts_per_token().view(B, L).double().mean(-1) / n_layers
                t_all.append(t_B.double())
                ept_all.append(ept_B)
        by_domain[name] = dom_sum / inputs.shape[0]
        total += dom_sum
        total_windows += inputs.shape[0]
    if was_training:
        model.train()
    out: dict[str, Any] = {"step": step, "val_loss": total / total_windows, "val_loss_by_domain": by_domain}
    if stats:
        out.update({**routing.result(), "experts_per_token_by_t": bin_by_t(torch.cat(t_all), torch.cat(ept_all))})
    return out


def bin_by_t(t_N: torch.Tensor, value_N: torch.Tensor, bins: int = T_BINS) -> list[dict[str, float]]:
    """[{t_lo, t_hi, mean, count}] of `value` within `bins` equal bins of t over [0, 1] (empty bins left out)."""
    index_N = (t_N * bins).long().clamp(0, bins - 1)
    out = []
    for b in range(bins):
        sel = index_N == b
        if sel.any():
            out.append({"t_lo": b / bins, "t_hi": (b + 1) / bins, "mean": value_N[sel].mean().item(),
                        "count": int(sel.sum())})
    return out


def _eval_record(model: MaskedDiffusionLM, val_sets: list, cfg: TrainConfig, *, step: int) -> dict[str, Any]:
    ev = evaluate_nelbo(model, val_sets, batch_size=cfg.eval_batch_size, step=step)
    return {"kind": "eval", "step": step, "val_loss": ev["val_loss"], "by_domain": ev["val_loss_by_domain"]}


