"""Selective Sinkhorn routing: with probability p per (step, layer), assign tokens by entropic optimal transport.

Papers: Selective Sinkhorn Routing (SSR) for Mixture-of-Experts; BASE Layers: Simplifying Training of Large,
Sparse Models (Lewis et al., 2021) for the balanced assignment.

Defining property: on the transport branch the plan Π has row sums 1 and column sums n/E (n real tokens), so hard
loads stay near n·k/E even for strongly skewed logits. Off the branch (probability 1 - p, and always in eval) the
router is softmax top-k, bit-identical to `topk` with the same gate and its default normalisation ("selected" for
k > 1, "none" for k = 1).

Algorithm (fp32, log domain, on detached costs):
    C = softmax(z) (cost="softmax") or z (cost="logits");  log K = C / ξ
    alternate  log v_e = log(n/E) - LSE_t(log K_te + log u_t),  log u_t = -LSE_e(log K_te + log v_e)
    until the column sums are within tol·(n/E) of n/E, or max_iter
    S_t = TopK(Π_t, k);  gate_from="plan": g_ti = Π_ti / Σ_{j∈S_t} Π_tj (no gradient: Π is detached)
                         gate_from="scores": softmax(z) at S_t, normalised as the top-k branch
    balanced=True (BASE-style, k = 1): round Π greedily (largest entries first) to at most ceil(n/E) tokens per
    expert, exactly n/E when E divides n.
The branch is a deterministic function of (seed, ctx.step, ctx.layer_index); without ctx.step, of the router's own
count of optimizer steps (the `step_count` buffer, advanced by `routelab.update_routers` after training forwards), so
that gradient accumulation and extra no-grad forwards do not change which branch a step takes. Padding is outside the marginals and never assigned.

Options (keyword-only) and defaults: k=2, p=0.01, xi=0.05, max_iter=100, tol=1e-4, cost="softmax",
gate_from="plan", balanced=False, seed=0. No balance loss.

Follows the paper: the transport problem, the selective use with probability p, gates from the plan. Our
reconstruction (secondary sources): the solver details, the defaults of p and ξ, the tolerance test, BASE's greedy
rounding (BASE's own auction solver and its identity mixing are not reproduced).

Causality: the transport branch reads every token of the batch, so the router is causal only in eval mode (or with
p = 0); `causal` reports the current mode. Training and eval therefore route differently (documented mismatch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._checks import check_bool, check_choice, check_int, check_number
from routelab.routing._util import flatten_choices, real_mask, top_indices, top_k_choices, unit_interval
from routelab.routing.base import Router, RoutingContext, RoutingDecision, router_dtype
from routelab.routing.registry import register_router

COSTS = ("softmax", "logits")
GATES_FROM = ("plan", "scores")


def sinkhorn_plan(cost_TE: Tensor, *, xi: float, max_iter: int, tol: float) -> Tensor:
    """The entropic transport plan Π [T, E]: rows sum to 1, columns to T/E (log domain; no gradient)."""
    T, E = cost_TE.shape
    if T == 0:
        return cost_TE.new_zeros(0, E)
    log_K = cost_TE.detach() / xi
    col_target = T / E
    log_col = math.log(col_target)
    log_u = torch.zeros(T, dtype=cost_TE.dtype, device=cost_TE.device)
    log_v = torch.zeros(E, dtype=cost_TE.dtype, device=cost_TE.device)
    for _ in range(max_iter):
        log_v = log_col - torch.logsumexp(log_K + log_u[:, None], dim=0)
        log_u = -torch.logsumexp(log_K + log_v[None, :], dim=1)
        cols = torch.exp(log_K + log_u[:, None] + log_v[None, :]).sum(0)
        if float((cols - col_target).abs().max()) <= tol * col_target:
            break
    return torch.exp(log_K + log_u[:, None] + log_v[None, :])


def balanced_rounding(plan_TE: Tensor) -> Tensor:
    """LongTensor [T]: one expert per token, largest plan entries first, at most ceil(T/E) tokens per expert."""
    T, E = plan_TE.shape
    capacity = math.ceil(T / E) if T else 0
    order = torch.sort(plan_TE.reshape(-1), descending=True, stable=True).indices.tolist()
    expert_T = [-1] * T
    load = [0] * E
    left = T
    for flat in order:  # NOTE: a Python loop over T·E entries; BASE-style routing is a training-only branch.
        t, e = divmod(flat, E)
        if expert_T[t] < 0 and load[e] < capacity:
            expert_T[t] = e
            load[e] += 1
            left -= 1
            if not left:
                break
    return torch.tensor(expert_T, dtype=torch.long, device=plan_TE.device)


@register_router("sinkhorn")
class SinkhornRouter(Router):
    """Softmax top-k that, with probability p per training (step, layer), routes by a Sinkhorn transport plan."""

    causal = False  # the class in general; each instance reports its mode (see `train`)

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        k: int = 2,
        p: float = 0.01,
        xi: float = 0.05,
        max_iter: int = 100,
        tol: float = 1e-4,
        cost: str = "softmax",
        gate_from: str = "plan",
        balanced: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        check_int("k", k, 1, num_experts)
        check_number("p", p, low=0, high=1)
        check_number("xi", xi, low=0, open_low=True)
        check_int("max_iter", max_iter, 1)
        check_number("tol", tol, low=0, open_low=True)
        check_choice("cost", cost, COSTS)
        check_choice("gate_from", gate_from, GATES_FROM)
        check_bool("balanced", balanced)
        if balanced and k != 1:
            raise ValueError(f"balanced=True (BASE-style assignment) needs k=1, got k={k}")
        check_int("seed", seed, 0)
        self.k, self.p, self.xi, self.max_iter, self.tol = k, float(p), float(xi), max_iter, float(tol)
        self.cost, self.gate_from, self.balanced, self.seed = cost, gate_from, balanced, seed
        self.normalize = "selected" if k > 1 else "none"
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=d_model**-0.5)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("_stepped", torch.zeros((), dtype=torch.bool), persistent=False)
        self.causal = self.p == 0 or not self.training

    def train(self, mode: bool = True) -> SinkhornRouter:
        """Also updates `causal`: the transport branch (training only, p > 0) reads every token of the batch."""
        super().train(mode)
        self.causal = self.p == 0 or not mode
        return self

    @torch.no_grad()
    def apply_updates(self) -> None:
        # Counts optimizer steps that had training forwards, so eval-only calls leave the state as it was.
        if bool(self._stepped):
            self.step_count += 1
            self._stepped.fill_(False)

    def transport_branch(self, ctx: RoutingContext | None) -> bool:
        """Whether this forward routes by transport: a deterministic function of (seed, step, layer)."""
        if not self.training or self.p == 0:
            return False
        step = ctx.step if ctx is not None and ctx.step is not None else int(self.step_count)
        layer = ctx.layer_index if ctx is not None and ctx.layer_index is not None else 0
        return unit_interval(self.seed, step, layer) < self.p

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        T, E, k = x_TD.shape[0], self.num_experts, self.k
        dtype = router_dtype(x_TD)
        logits_TE = F.linear(x_TD.to(dtype), self.gate.weight.to(dtype))
        scores_TE = logits_TE.softmax(dim=-1)
        real_T = real_mask(ctx, T, x_TD.device)
        transport = self.transport_branch(ctx)
        if self.training and torch.is_grad_enabled():
            self._stepped.fill_(True)

        if not transport:
            token_S, expert_S, weight_S = top_k_choices(scores_TE, k, real_T, renormalize=self.normalize == "selected")
        else:
            real_idx = real_T.nonzero().squeeze(1)
            cost_NE = (scores_TE if self.cost == "softmax" else logits_TE).detach()[real_idx]
            plan_NE = sinkhorn_plan(cost_NE, xi=self.xi, max_iter=self.max_iter, tol=self.tol)
            if self.balanced:
                expert_NK = balanced_rounding(plan_NE)[:, None]
            else:
                expert_NK = top_indices(plan_NE, k)
            if self.gate_from == "plan":
                weight_NK = plan_NE.gather(1, expert_NK)
                weight_NK = weight_NK / weight_NK.sum(dim=-1, keepdim=True)
            else:
                weight_NK = scores_TE[real_idx].gather(1, expert_NK)
                if self.normalize == "selected":
                    weight_NK = weight_NK / weight_NK.sum(dim=-1, keepdim=True)
            token_S, expert_S, weight_S = flatten_choices(expert_NK, weight_NK)
            token_S = real_idx[token_S]

        return RoutingDecision(
            token_index=token_S,
            expert_index=expert_S,
            weight=weight_S,
            num_tokens=T,
            num_experts=E,
            router_logits=logits_TE,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, p={self.p}, xi={self.xi}, balanced={self.balanced}"
