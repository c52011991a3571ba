"""Retrofitted skip / execute / repeat routers over the blocks of a trained, frozen LM.

Papers: Heakl, Gubri, Khan, Yun, Oh, "Dr.LLM: Dynamic Layer Routing in LLMs" (2025); Jain et al., "FiRST:
Finetuning Router-Selective Transformers for Input-Adaptive Latency Reduction" (2024).

Defining property: the base model's weights never change. Each block ℓ gets a small router that reads a summary of
the hidden states at the block's input and picks one of three actions — **skip** (the block runs 0 times: the
residual stream passes through), **execute** (once) or **repeat** (twice in a row, the second run on the first
run's output) — trained by plain supervised learning on layer configurations ("plans") found by search under a
compute budget.

Shape legend: B sequences, L positions, D model width, N blocks (n_layers), W pooling windows, V vocabulary,
Q plans. A plan is a tuple of N block-run counts in {0, 1, 2}; `sum(plan)` is its block runs.

What is reconstructed here, and where it departs (decisions for a small LM on CPU):

- **Execution** (`run_plans`): block ℓ under action a runs exactly `a` times what `MoETransformerLM.forward` runs
  for it (attention sublayer, then the feed-forward sublayer, each with its residual); the plan of all ones is the
  model's own forward, bit for bit. Every sequence may have its own plan (the blocks run on the sub-batch that
  executes them). Full-sequence forwards only: no incremental decoding (a decode cache would need one slot per run).
  Routers that hand a state from one MoE layer to the next (`recurrent`) are refused: a skipped or repeated block
  has no single "previous layer" for them.
- **Honest decisions for an LM** (as FiRST decides at prefill and Dr.LLM from the prompt): one plan per sequence,
  decided from its first P tokens (the *prompt*); the loss that judges every plan is the mean next-token
  cross-entropy of the *continuation* (tokens P..L-1, predicted from positions P-1..L-2). Attention is causal, so
  the prompt's hidden states at block ℓ depend only on the prompt and the actions already taken: a router never
  sees the tokens it is judged on. (Routers of the base model that look at other tokens of the batch — the
  non-causal ones, e.g. expert choice — break this, as they do for the plain model.)
- **Budget and search** (`plan_losses`, `search_plans`, `beam_search_plans`): a plan is feasible when its block
  runs are at most `floor(budget · N)`; budget in (0, 2] (1.0: no more runs than the full model, spent on any mix of
  skips and repeats). Up to `max_plans` feasible plans (default 3^6, every budget for N ≤ 6) the search is exact:
  every feasible plan's continuation loss for every window, by a depth-first walk over the tree of plan prefixes
  (sequences share each prefix's hidden states, and a repeat reuses the execute's output), so the per-window
  optimum is the true argmin (ties go to fewer block runs). Beyond that, a beam search per window: each partial
  plan is scored by the exact loss of one completion (execute the later blocks in order while the budget lasts),
  the `beam` best go on, and the best complete plan scored on the way is kept. Dr.LLM searches with a length-aware
  MCTS because 3^N plans of a 30-layer LLM cannot be enumerated; enumeration needs no search hyper-parameters and
  routelab's presets have 2–4 layers, and the beam search is deterministic where MCTS is not. Not reconstructed:
  MCTS itself, and Dr.LLM's reward of accuracy on a downstream task (here: LM loss on the continuation).
- **Routers** (`LayerRouters`): per block a bottleneck MLP D → h → 3 (GELU), applied to each of W window means of
  the prompt's hidden states at the block's input (the first W·⌊P/W⌋ prompt positions cut into W equal windows, as
  Dr.LLM's windowed mean pooling), logits averaged over the windows, argmax. Departure: each window mean is
  RMS-normalised before the MLP (no parameters), because the residual stream's scale grows with depth and a tiny
  model's early stream is ~0.02 in size. At inference a router's choice is clipped to the block runs left in the
  budget (a block never runs more often than the budget allows), so a routed plan is always feasible.
- **Training** (`train_routers`): the focal loss (Lin et al.) with Dr.LLM's class balancing, α_c ∝ 1 / count of
  class c per layer; teacher forcing: router ℓ learns from the prompt's hidden states obtained by running the
  searched plan's earlier actions. The base model runs under `torch.no_grad()`; only router parameters are trained.
- **Compute** (the report's columns): block runs per token relative to the full model (skip 0, execute 1,
  repeat 2, each block counted alike), and routed-expert FLOPs per token relative to the full model (every MoE
  run's assignments, weighted by expert width as `routelab compare` counts them). Router FLOPs (two tiny matmuls
  per block and sequence) are not counted.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._checks import check_bool, check_int, check_number

__all__ = [
    "ACTIONS",
    "LayerRouters",
    "RouterConfig",
    "beam_search_plans",
    "class_weights",
    "feasible_plans",
    "focal_loss",
    "load_routers",
    "plan_losses",
    "prompt_features",
    "retrofit",
    "route",
    "run_plans",
    "save_routers",
    "search_plans",
    "train_routers",
]

ACTIONS = ("skip", "execute", "repeat")  # index = block runs
MAX_PLANS = 729  # 3^6: the largest exhaustive search by default


# ---------------------------------------------------------------------------------------------------------------
# execution


def _check_model(model: nn.Module) -> None:
    from routelab.models.transformer import MoETransformerLM

    if not isinstance(model, MoETransformerLM):
        raise TypeError(f"model must be a routelab MoETransformerLM (routelab.load_model), got {type(model).__name__}")
    if model.config.mod_capacity is not None:
        raise ValueError(f"this model routes its blocks already (Mixture-of-Depths, model.mod_capacity="
                         f"{model.config.mod_capacity}); retrofit plans skip/execute/repeat over a plain block stack")


def _run_block(model: nn.Module, i: int, x_BLD: Tensor, ids_BL: Tensor) -> tuple[Tensor, float]:
    """Block i once, as `MoETransformerLM.forward` runs it (`models.transformer.run_block`); (new x, routed-expert
    units spent)."""
    from routelab.layers.moe import MoELayer
    from routelab.models.transformer import run_block
    from routelab.routing.base import RoutingContext
    from routelab.train.loop import active_expert_units

    block = model.blocks[i]
    ctx = None
    if isinstance(block.ffn, MoELayer):
        ctx = RoutingContext(token_ids=ids_BL, layer_index=sum(isinstance(b.ffn, MoELayer) for b in model.blocks[:i]))
    x_BLD, decision = run_block(block, i, x_BLD, model.rope_cos, model.rope_sin, None, ctx)
    if decision is None:
        return x_BLD, 0.0
    if decision.state is not None:
        raise ValueError(f"block {i}'s router {type(block.ffn.router).__name__} hands a state to the next MoE layer; "
                         "retrofitted skip/repeat routing needs routers without one (a skipped or repeated block has "
                         "no single previous layer)")
    return x_BLD, active_expert_units(block.ffn, decision)


def _logits(model: nn.Module, x_BLD: Tensor) -> Tensor:
    return F.linear(model.final_norm(x_BLD), model.embed.weight)


Chooser = Callable[[int, Tensor], Tensor]  # (block index, x_BLD at the block's input) -> runs_B in {0, 1, 2}


@dataclass
class PlanRun:
    """The result of one forward under per-sequence plans: final hidden states, the runs taken, expert units."""

    x_BLD: Tensor
    runs_BN: Tensor
    expert_units: float


def _execute(model: nn.Module, ids_BL: Tensor, choose: Chooser, *, start: int = 0, x_BLD: Tensor | None = None
             ) -> PlanRun:
    """Blocks start..n-1 under `choose`, from the embeddings (start 0) or from `x_BLD` at block `start`'s input."""
    x_BLD = model.embed(ids_BL) if x_BLD is None else x_BLD
    B, n = ids_BL.shape[0], len(model.blocks)
    runs_BN = torch.zeros(B, n, dtype=torch.long)
    units = 0.0
    for i in range(start, n):
        runs_B = choose(i, x_BLD).to(torch.long).reshape(B)
        if bool(((runs_B < 0) | (runs_B > 2)).any()):
            raise ValueError(f"block {i}: runs must be 0 (skip), 1 (execute) or 2 (repeat), got {runs_B.tolist()}")
        runs_BN[:, i] = runs_B
        for r in (1, 2):
            active_B = runs_B >= r
            if bool(active_B.all()):  # the whole batch: exactly the model's own computation
                x_BLD, u = _run_block(model, i, x_BLD, ids_BL)
            elif bool(active_B.any()):
                rows = active_B.nonzero().squeeze(1)
                y_BLD, u = _run_block(model, i, x_BLD[rows], ids_BL[rows])
                x_BLD = x_BLD.index_put((rows,), y_BLD)
            else:
                u = 0.0
            units += u
    return PlanRun(x_BLD, runs_BN, units)


def run_plans(model: nn.Module, ids_BL: Tensor, plans: Tensor | list | tuple) -> tuple[Tensor, PlanRun]:
    """Logits [B, L, V] of `model` with block i of sequence b run `plans[b][i]` times (0 skip, 1 execute, 2 repeat).

    plans: one plan for every sequence (n_layers counts) or one per sequence ([B, n_layers]). The plan of all ones gives exactly
    `model(ids_BL)[0]`. Returns (logits, PlanRun)."""
    _check_model(model)
    plans_BN = _plans_tensor(plans, ids_BL.shape[0], len(model.blocks))
    run = _execute(model, ids_BL, lambda i, x: plans_BN[:, i])
    return _logits(model, run.x_BLD), run


def _plans_tensor(plans: Tensor | list | tuple, B: int, n: int) -> Tensor:
    p = torch.as_tensor(plans, dtype=torch.long)
    if p.dim() == 1:
        p = p.expand(B, -1)
    if p.shape != (B, n) or bool(((p < 0) | (p > 2)).any()):
        values = f" with values {int(p.min())}..{int(p.max())}" if p.numel() else ""
        raise ValueError(f"plans must hold {n} block-run counts in {{0, 1, 2}} (one plan, or one per sequence: "
                         f"[{B}, {n}]), got shape {tuple(p.shape)}{values}")
    return p


def _continuation_loss_B(model: nn.Module, x_BLD: Tensor, ids_BL: Tensor, prompt_len: int) -> Tensor:
    """Mean next-token cross-entropy [B] of tokens prompt_len..L-1 (in fp32 at least)."""
    logits = _logits(model, x_BLD[:, prompt_len - 1 : -1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = ids_BL[:, prompt_len:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return loss.view(targets.shape).mean(1)


# ---------------------------------------------------------------------------------------------------------------
# search


def max_runs(budget: float, n_layers: int) -> int:
    """Block runs a feasible plan may spend: floor(budget · n_layers) (a tiny tolerance keeps 0.75·4 = 3)."""
    check_number("budget", budget, low=0.0, high=2.0, open_low=True)
    return math.floor(budget * n_layers + 1e-9)


def feasible_plans(n_layers: int, max_block_runs: int) -> list[tuple[int, ...]]:
    """Every plan in {0, 1, 2}^n_layers with at most `max_block_runs` runs, ordered by (runs, plan)."""
    plans = [p for p in itertools.product(range(3), repeat=n_layers) if sum(p) <= max_block_runs]
    return sorted(plans, key=lambda p: (sum(p), p))


@torch.no_grad()
def plan_losses(
    model: nn.Module, ids_NL: Tensor, *, prompt_len: int, budget: float, batch_size: int = 16,
    max_plans: int = MAX_PLANS,
) -> tuple[list[tuple[int, ...]], Tensor]:
    """(plans, losses [N_windows, Q]): the continuation loss of every window under every feasible plan, exactly.

    A depth-first walk over the tree of plan prefixes: at depth ℓ the batch's hidden states are shared by every plan
    with that prefix, and "repeat" continues from "execute"'s output, so each tree node costs at most two block runs.
    """
    _check_model(model)
    n = len(model.blocks)
    _check_windows(ids_NL, prompt_len)
    plans = feasible_plans(n, max_runs(budget, n))
    if len(plans) > max_plans:
        raise ValueError(f"budget={budget} with {n} blocks allows {len(plans)} plans, more than max_plans={max_plans} "
                         f"for the exhaustive search; lower the budget or raise max_plans")
    column = {p: q for q, p in enumerate(plans)}
    cap = max_runs(budget, n)
    was_training = model.training
    model.eval()
    out = torch.empty(ids_NL.shape[0], len(plans), dtype=torch.float64)
    try:
        for start in range(0, ids_NL.shape[0], batch_size):
            ids_BL = ids_NL[start : start + batch_size]
            rows = slice(start, start + ids_BL.shape[0])
            stack = [(0, model.embed(ids_BL), ())]  # depth-first: (depth, x_BLD at that block's input, prefix)
            while stack:
                depth, x_BLD, prefix = stack.pop()
                if depth == n:
                    out[rows, column[prefix]] = _continuation_loss_B(model, x_BLD, ids_BL, prompt_len).double()
                    continue
                left = cap - sum(prefix)
                stack.append((depth + 1, x_BLD, prefix + (0,)))
                if left >= 1:
                    x1_BLD, _ = _run_block(model, depth, x_BLD, ids_BL)
                    stack.append((depth + 1, x1_BLD, prefix + (1,)))
                    if left >= 2:
                        x2_BLD, _ = _run_block(model, depth, x1_BLD, ids_BL)  # repeat = execute, then once more
                        stack.append((depth + 1, x2_BLD, prefix + (2,)))
    finally:
        model.train(was_training)
    return plans, out


def search_plans(plans: list[tuple[int, ...]], losses_NQ: Tensor) -> Tensor:
    """The best plan of each window, LongTensor [N_windows, n_layers]: the argmin of its losses (`plans` ordered by
    runs, so a tie goes to the plan with fewer block runs)."""
    best = losses_NQ.argmin(dim=1)
    return torch.tensor(plans, dtype=torch.long)[best]


def _fill(prefix: tuple[int, ...], n: int, cap: int) -> tuple[int, ...]:
    """`prefix` completed by executing each later block once while the budget lasts, then skipping."""
    plan, left = list(prefix), cap - sum(prefix)
    for _ in range(n - len(prefix)):
        plan.append(1 if left > 0 else 0)
        left -= plan[-1]
    return tuple(plan)


@torch.no_grad()
def beam_search_plans(
    model: nn.Module, ids_NL: Tensor, *, prompt_len: int, budget: float, beam: int = 4, batch_size: int = 16,
) -> tuple[Tensor, Tensor]:
    """(plans [N_windows, n_layers], losses [N_windows]): for models too deep to enumerate, a beam search per window.

    Block by block, every partial plan in a window's beam is extended by skip / execute / repeat (within the budget);
    each extension is scored by the exact continuation loss of one complete plan, itself completed by executing the
    later blocks once while the budget lasts (`_fill`); the `beam` best extensions (ties: fewer block runs) go on.
    Returned is the best complete plan scored anywhere on the way (so never worse than the greedy fill). With a beam
    as wide as the tree, every plan is scored at the last block and the result is the exhaustive search's."""
    _check_model(model)
    n = len(model.blocks)
    _check_windows(ids_NL, prompt_len)
    check_int("beam", beam, 1)
    cap = max_runs(budget, n)
    was_training = model.training
    model.eval()
    plans_NN = torch.empty(ids_NL.shape[0], n, dtype=torch.long)
    losses_N = torch.empty(ids_NL.shape[0], dtype=torch.float64)
    try:
        for start in range(0, ids_NL.shape[0], batch_size):
            ids_BL = ids_NL[start : start + batch_size]
            B = ids_BL.shape[0]
            x_SLD, owner, prefixes = model.embed(ids_BL), list(range(B)), [() for _ in range(B)]
            best: list[tuple[float, int, tuple[int, ...]]] = [(math.inf, 0, ())] * B
            for depth in range(n):
                owner_ids = ids_BL[owner]
                x1_SLD, _ = _run_block(model, depth, x_SLD, owner_ids)
                x2_SLD, _ = _run_block(model, depth, x1_SLD, owner_ids)  # repeat = execute, then once more
                kids = [(s, a) for s, p in enumerate(prefixes) for a in range(3) if sum(p) + a <= cap]
                x_CLD = torch.stack((x_SLD, x1_SLD, x2_SLD))[[a for _, a in kids], [s for s, _ in kids]]
                kid_prefix = [prefixes[s] + (a,) for s, a in kids]
                kid_owner = [owner[s] for s, _ in kids]
                full_CN = torch.tensor([_fill(p, n, cap) for p in kid_prefix], dtype=torch.long)
                ids_CL = ids_BL[kid_owner]
                done = _execute(model, ids_CL, lambda i, _x, f=full_CN: f[:, i], start=depth + 1, x_BLD=x_CLD)
                loss_C = _continuation_loss_B(model, done.x_BLD, ids_CL, prompt_len).double().tolist()
                ranked: dict[int, list[tuple[float, int, int]]] = {}
                for c, (w, loss) in enumerate(zip(kid_owner, loss_C)):
                    key = (loss, int(full_CN[c].sum()), tuple(full_CN[c].tolist()))
                    best[w] = min(best[w], key)
                    ranked.setdefault(w, []).append((loss, sum(kid_prefix[c]), c))
                keep = [c for w in range(B) for _, _, c in sorted(ranked[w])[:beam]]
                x_SLD, owner, prefixes = x_CLD[keep], [kid_owner[c] for c in keep], [kid_prefix[c] for c in keep]
            plans_NN[start : start + B] = torch.tensor([b[2] for b in best], dtype=torch.long)
            losses_N[start : start + B] = torch.tensor([b[0] for b in best], dtype=torch.float64)
    finally:
        model.train(was_training)
    return plans_NN, losses_N


def _check_windows(ids_NL: Tensor, prompt_len: int) -> None:
    if not isinstance(ids_NL, Tensor) or ids_NL.dim() != 2 or ids_NL.dtype != torch.long or ids_NL.shape[0] == 0:
        raise ValueError(f"windows must be token ids, a non-empty LongTensor [N, L], got {getattr(ids_NL, 'shape', ids_NL)!r}")
    check_int("prompt_len", prompt_len, 1, ids_NL.shape[1] - 1)


# ---------------------------------------------------------------------------------------------------------------
# routers


@dataclass(frozen=True)
class RouterConfig:
    """d_model, n_layers: the base model's; hidden: the bottleneck width h; pool_windows: W; prompt_len: P (W ≤ P);
    budget: the block-run budget (fraction of n_layers, in (0, 2]) the routers' plans are clipped to."""

    d_model: int
    n_layers: int
    hidden: int
    pool_windows: int
    prompt_len: int
    budget: float

    def validate(self) -> None:
        for name in ("d_model", "n_layers", "hidden", "pool_windows", "prompt_len"):
            check_int(f"routers.{name}", getattr(self, name), 1)
        if self.pool_windows > self.prompt_len:
            raise ValueError(f"routers.pool_windows={self.pool_windows} must be <= prompt_len={self.prompt_len} "
                             "(each window holds at least one prompt token)")
        check_number("routers.budget", self.budget, low=0.0, high=2.0, open_low=True)


class LayerRouters(nn.Module):
    """One bottleneck MLP router per block (Dr.LLM): `logits(i, x_BLD)` → [B, 3] (skip, execute, repeat)."""

    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        D, h = config.d_model, config.hidden
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(D, h), nn.GELU(), nn.Linear(h, 3))
                                  for _ in range(config.n_layers))

    def pool(self, x_BLD: Tensor) -> Tensor:
        """Window means [B, W, D] of the prompt's hidden states, each RMS-normalised (see the module docstring)."""
        W, P = self.config.pool_windows, self.config.prompt_len
        size = P // W
        m_BWD = x_BLD[:, : W * size].reshape(x_BLD.shape[0], W, size, -1).mean(2)
        return m_BWD * torch.rsqrt(m_BWD.pow(2).mean(-1, keepdim=True) + 1e-6)

    def window_logits(self, i: int, pooled_BWD: Tensor) -> Tensor:
        """Router i's logits [B, 3]: its MLP on each window mean, averaged over the windows."""
        return self.mlps[i](pooled_BWD).mean(1)

    def logits(self, i: int, x_BLD: Tensor) -> Tensor:
        return self.window_logits(i, self.pool(x_BLD))


def route(model: nn.Module, routers: LayerRouters, ids_BL: Tensor) -> tuple[Tensor, PlanRun]:
    """Logits [B, L, V] of `model` under the plans its routers choose, block by block, from each sequence's prompt;
    each choice clipped to the block runs the budget leaves (`PlanRun.runs_BN` holds the plans taken)."""
    _check_model(model)
    cfg = routers.config
    if cfg.n_layers != len(model.blocks) or cfg.d_model != model.config.d_model:
        raise ValueError(f"routers were built for {cfg.n_layers} blocks of width {cfg.d_model}, the model has "
                         f"{len(model.blocks)} of width {model.config.d_model}")
    if ids_BL.shape[1] <= cfg.prompt_len:
        raise ValueError(f"sequences of {ids_BL.shape[1]} tokens leave no continuation after the routers' prompt of "
                         f"{cfg.prompt_len} tokens")
    cap = max_runs(cfg.budget, cfg.n_layers)
    used_B = torch.zeros(ids_BL.shape[0], dtype=torch.long)

    def choose(i: int, x_BLD: Tensor) -> Tensor:
        nonlocal used_B
        want_B = routers.logits(i, x_BLD).argmax(-1)
        runs_B = torch.minimum(want_B, cap - used_B)
        used_B = used_B + runs_B
        return runs_B

    with torch.no_grad():
        run = _execute(model, ids_BL, choose)
        return _logits(model, run.x_BLD), run


@torch.no_grad()
def prompt_features(model: nn.Module, routers: LayerRouters, ids_NL: Tensor, plans_NN: Tensor, *,
                    batch_size: int = 16) -> Tensor:
    """Teacher forcing: the pooled prompt features [n_layers, N, W, D] each router sees when the windows run their
    given plans (router ℓ's input follows the plan's actions at blocks < ℓ)."""
    feats: list[list[Tensor]] = [[] for _ in range(len(model.blocks))]

    def teacher(plans_BN: Tensor) -> Chooser:
        def choose(i: int, x_BLD: Tensor) -> Tensor:
            feats[i].append(routers.pool(x_BLD))
            return plans_BN[:, i]
        return choose

    for start in range(0, ids_NL.shape[0], batch_size):
        _execute(model, ids_NL[start : start + batch_size], teacher(plans_NN[start : start + batch_size]))
    return torch.stack([torch.cat(f) for f in feats])


# ---------------------------------------------------------------------------------------------------------------
# training


def focal_loss(logits_NC: Tensor, target_N: Tensor, *, gamma: float = 2.0, weight_C: Tensor | None = None) -> Tensor:
    """Σ_i α_{y_i} (1 − p_{i,y_i})^γ (−log p_{i,y_i}) / Σ_i α_{y_i} (Lin et al.'s focal loss; α = `weight_C`, all
    ones when None). Normalised as `F.cross_entropy(weight=...)` is, so with γ = 0 the two are equal."""
    check_number("gamma", gamma, low=0.0)
    logp_N = F.log_softmax(logits_NC.float(), dim=-1).gather(1, target_N[:, None]).squeeze(1)
    alpha_N = torch.ones_like(logp_N) if weight_C is None else weight_C.to(logp_N)[target_N]
    modulating_N = (1 - logp_N.exp()).clamp_min(0).pow(gamma) if gamma else torch.ones_like(logp_N)
    return -(alpha_N * modulating_N * logp_N).sum() / alpha_N.sum()


def class_weights(target_N: Tensor, num_classes: int = 3) -> Tensor:
    """Class-balancing weights [C]: α_c = N / (C_present · count_c) for each class present, 0 for absent ones (they
    have no samples to weigh); the present classes then weigh equally in total."""
    counts = torch.bincount(target_N, minlength=num_classes).double()
    present = int((counts > 0).sum())
    return torch.where(counts > 0, target_N.numel() / (present * counts.clamp_min(1)), torch.zeros_like(counts)).float()


def train_routers(
    routers: LayerRouters, feats_LNWD: Tensor, plans_NN: Tensor, *, steps: int = 100, lr: float = 3e-3,
    gamma: float = 2.0, class_balance: bool = True, weight_decay: float = 0.01, seed: int = 0,
) -> list[float]:
    """Full-batch AdamW on the sum over blocks of each router's focal loss (class-balanced unless `class_balance`
    is False) against the searched actions; returns the loss per step. Only `routers`' parameters change."""
    check_int("steps", steps, 1)
    check_number("lr", lr, low=0.0, open_low=True)
    check_number("gamma", gamma, low=0.0)
    torch.manual_seed(seed)
    feats_LNWD = feats_LNWD.detach()
    check_bool("class_balance", class_balance)
    weights = [class_weights(plans_NN[:, i]) if class_balance else None for i in range(plans_NN.shape[1])]
    opt = torch.optim.AdamW(routers.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    routers.train()
    for _ in range(steps):
        loss = sum(focal_loss(routers.window_logits(i, feats_LNWD[i]), plans_NN[:, i], gamma=gamma,
                              weight_C=weights[i]) for i in range(plans_NN.shape[1]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    routers.eval()
    return history


# ---------------------------------------------------------------------------------------------------------------
# the whole procedure and its report


@torch.no_grad()
def _evaluate(model: nn.Module, ids_NL: Tensor, prompt_len: int, batch_size: int, forward) -> dict[str, Any]:
    """Continuation loss, block runs and expert units of `forward(ids_BL) -> PlanRun` over the windows."""
    losses, runs, units = [], [], 0.0
    for start in range(0, ids_NL.shape[0], batch_size):
        ids_BL = ids_NL[start : start + batch_size]
        run = forward(ids_BL, start)
        losses.append(_continuation_loss_B(model, run.x_BLD, ids_BL, prompt_len).double())
        runs.append(run.runs_BN)
        units += run.expert_units
    loss_N, runs_NN = torch.cat(losses), torch.cat(runs)
    return {"loss_N": loss_N, "runs_NN": runs_NN, "expert_units": units}


def retrofit(
    model: nn.Module, train_ids: Tensor, val_ids: Tensor, *, budget: float, prompt_len: int, pool_windows: int = 4,
    hidden: int | None = None, gamma: float = 2.0, class_balance: bool = True, steps: int = 100, lr: float = 3e-3,
    batch_size: int = 16, seed: int = 0, max_plans: int = MAX_PLANS, beam: int = 4,
    log: Callable[[str], None] | None = None,
) -> tuple[LayerRouters, dict[str, Any]]:
    """Search plans on `train_ids` windows, train routers on them, and evaluate on `val_ids` windows.

    The search is exhaustive (`plan_losses`) when the budget allows at most `max_plans` plans, else a beam search of
    width `beam` (`beam_search_plans`); the best static plan is then the best, on the training windows, of the 16
    plans the search chose most often and the budget's fill plan (execute blocks in order while the budget lasts).

    Returns (routers, report): validation loss and perplexity of the full model, the per-window searched plans (the
    oracle), the routers' plans, and the best static plan under the budget (chosen on the training windows), each
    with its block runs and routed-expert FLOPs per token relative to the full model; router accuracy per block
    (teacher-forced, against the validation windows' searched actions) beside the majority-class accuracy."""
    _check_model(model)
    log = log or (lambda _msg: None)
    n, D = len(model.blocks), model.config.d_model
    for name, ids in (("train windows", train_ids), ("validation windows", val_ids)):
        try:
            _check_windows(ids, prompt_len)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    check_int("batch_size", batch_size, 1)
    check_int("max_plans", max_plans, 1)
    check_int("beam", beam, 1)
    config = RouterConfig(d_model=D, n_layers=n, hidden=hidden if hidden is not None else max(4, D // 4),
                          pool_windows=pool_windows, prompt_len=prompt_len, budget=budget)
    config.validate()
    cap = max_runs(budget, n)
    n_plans = len(feasible_plans(n, cap)) if 3**n <= 1 << 20 else math.inf  # beyond that: beam search regardless
    exhaustive = n_plans <= max_plans
    was_training = model.training
    model.eval()
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    timings: dict[str, float] = {}

    def fixed(plans_NN: Tensor):
        return lambda ids_BL, s: _execute(model, ids_BL, lambda i, x: plans_NN[s : s + ids_BL.shape[0], i])

    try:
        # the retrofitted execution must reproduce the model: the all-ones plan against the model's own forward
        probe = val_ids[: min(batch_size, val_ids.shape[0])]
        with torch.no_grad():
            if not torch.equal(run_plans(model, probe, [1] * n)[0], model(probe)[0]):
                raise ValueError("this model's forward is not the plain block stack retrofit executes (the all-ones plan "
                                 "differs from model(ids)); retrofit supports MoETransformerLM models without depth options")
        t0 = time.perf_counter()
        if exhaustive:
            log(f"search: all {n_plans} plans (≤ {cap} block runs of {n}) × {train_ids.shape[0]} training windows")
            plans, train_losses = plan_losses(model, train_ids, prompt_len=prompt_len, budget=budget,
                                              batch_size=batch_size, max_plans=max_plans)
            train_best, train_best_loss = search_plans(plans, train_losses), train_losses.min(1).values
            log(f"search: {val_ids.shape[0]} validation windows")
            _, val_losses = plan_losses(model, val_ids, prompt_len=prompt_len, budget=budget, batch_size=batch_size,
                                        max_plans=max_plans)
            val_best = search_plans(plans, val_losses)
            static_means = train_losses.mean(0)
            candidates = plans
        else:
            log(f"search: beam of {beam} over {n} blocks (≤ {cap} block runs) × {train_ids.shape[0]} training windows")
            train_best, train_best_loss = beam_search_plans(model, train_ids, prompt_len=prompt_len, budget=budget,
                                                            beam=beam, batch_size=batch_size)
            log(f"search: {val_ids.shape[0]} validation windows")
            val_best, _ = beam_search_plans(model, val_ids, prompt_len=prompt_len, budget=budget, beam=beam,
                                            batch_size=batch_size)
            found, counts = torch.unique(train_best, dim=0, return_counts=True)
            candidates = sorted({tuple(p) for p in found[counts.argsort(descending=True)[:16]].tolist()}
                                | {_fill((), n, cap)}, key=lambda p: (sum(p), p))
            static_means = torch.stack([
                _evaluate(model, train_ids, prompt_len, batch_size,
                          fixed(torch.tensor(p).expand(train_ids.shape[0], -1)))["loss_N"].mean()
                for p in candidates])
        static = torch.tensor(candidates[int(static_means.argmin())], dtype=torch.long)
        timings["search_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        torch.manual_seed(seed)
        routers = LayerRouters(config)
        feats = prompt_features(model, routers, train_ids, train_best, batch_size=batch_size)
        history = train_routers(routers, feats, train_best, steps=steps, lr=lr, gamma=gamma,
                                 class_balance=class_balance, seed=seed)
        timings["train_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        ones = torch.ones(val_ids.shape[0], n, dtype=torch.long)
        evals = {
            "full": _evaluate(model, val_ids, prompt_len, batch_size, fixed(ones)),
            "oracle": _evaluate(model, val_ids, prompt_len, batch_size, fixed(val_best)),
            "static": _evaluate(model, val_ids, prompt_len, batch_size, fixed(static.expand(val_ids.shape[0], -1))),
            "routers": _evaluate(model, val_ids, prompt_len, batch_size, lambda ids_BL, s: route(model, routers, ids_BL)[1]),
        }
        val_feats = prompt_features(model, routers, val_ids, val_best, batch_size=batch_size)
        with torch.no_grad():
            predicted = torch.stack([routers.window_logits(i, val_feats[i]).argmax(-1) for i in range(n)], 1)
            train_predicted = torch.stack([routers.window_logits(i, feats[i]).argmax(-1) for i in range(n)], 1)
        timings["evaluate_s"] = time.perf_counter() - t0
    finally:
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
        model.train(was_training)

    full_units = evals["full"]["expert_units"]
    rows = {}
    for name, ev in evals.items():
        loss = float(ev["loss_N"].mean())
        runs_NN = ev["runs_NN"]
        rows[name] = {
            "loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else float("inf"),
            "block_runs_fraction": float(runs_NN.sum(1).double().mean() / n),
            "expert_flops_fraction": ev["expert_units"] / full_units if full_units > 0 else float("nan"),
            "action_shares_by_block": [[float((runs_NN[:, i] == a).double().mean()) for a in range(3)] for i in range(n)],
        }
    rows["static"]["plan"] = static.tolist()
    rows["routers"]["plan_matches_oracle"] = float((evals["routers"]["runs_NN"] == val_best).all(1).double().mean())
    majority = [float(torch.bincount(val_best[:, i], minlength=3).max()) / val_best.shape[0] for i in range(n)]
    report = {
        "method": "Dr.LLM-style retrofitted skip/execute/repeat routers",
        "search": "exhaustive" if exhaustive else f"beam {beam}",
        "budget": budget,
        "max_block_runs": cap,
        "n_layers": n,
        "plans_searched": n_plans if exhaustive else None,
        "prompt_len": prompt_len,
        "seq_len": int(val_ids.shape[1]),
        "continuation_tokens_per_window": int(val_ids.shape[1] - prompt_len),
        "train_windows": int(train_ids.shape[0]),
        "val_windows": int(val_ids.shape[0]),
        "routers": asdict(config),
        "router_parameters": sum(p.numel() for p in routers.parameters()),
        "focal_gamma": gamma,
        "class_balance": class_balance,
        "steps": steps,
        "lr": lr,
        "final_train_loss": history[-1],
        "rows": rows,
        "router_accuracy_by_block": [float((predicted[:, i] == val_best[:, i]).double().mean()) for i in range(n)],
        "router_train_accuracy_by_block": [float((train_predicted[:, i] == train_best[:, i]).double().mean())
                                           for i in range(n)],
        "majority_accuracy_by_block": majority,
        "oracle_train_loss": float(train_best_loss.mean()),
        "static_train_loss": float(static_means.min()),
        "timings_s": timings,
    }
    return routers, report


# ---------------------------------------------------------------------------------------------------------------
# files

ROUTER_FILES = ("routers.safetensors", "routers.json")


def save_routers(routers: LayerRouters, folder: str | Path) -> list[Path]:
    """routers.safetensors (weights) and routers.json (config), each written atomically; returns the paths."""
    import json

    from safetensors.torch import save

    from routelab._atomic import atomic_write_bytes, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in routers.state_dict().items()}
    atomic_write_bytes(folder / ROUTER_FILES[0], save(tensors))
    atomic_write_text(folder / ROUTER_FILES[1], json.dumps({"format": 1, "kind": "retrofit-routers",
                                                           "config": asdict(routers.config)}, indent=1) + "\n")
    return [folder / f for f in ROUTER_FILES]


def load_routers(folder: str | Path) -> LayerRouters:
    """Routers saved by `save_routers` (JSON and safetensors only; nothing unpickled)."""
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / ROUTER_FILES[1]).read_text(encoding="utf-8"))
        config = RouterConfig(**meta["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{folder / ROUTER_FILES[1]}: not a routelab retrofit routers file ({exc})") from None
    routers = LayerRouters(config)
    routers.load_state_dict(load_file(str(folder / ROUTER_FILES[0])))
    routers.eval()
    return routers
