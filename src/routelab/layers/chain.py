"""Chain-of-Experts: one MoE layer whose experts process each token in C sequential iterations.

Paper: Wang et al., "Chain-of-Experts: Unlocking the Communication Power of Mixture-of-Experts Models" (2025).

Defining property: iteration c routes the *output of iteration c-1* with its own router (routers are not shared
across iterations; the experts are), and adds a residual inside the layer:

    x⁰ = h,   xᶜ = xᶜ⁻¹ + Σ_e g_{c,e}(xᶜ⁻¹) · E_e(xᶜ⁻¹)      (c = 1..C)

With C = 1 this is exactly the plain MoE layer. Reconstruction: the layer returns the accumulated update
x^C - x⁰ = Σ_c Δᶜ (summed update by update, so C = 1 returns the plain layer's output bit for bit), because the
transformer block around it adds its own residual. The paper keeps compute fixed by lowering k per iteration (e.g.
C=2 with k halved); here k is the router's option and the accounting counts every iteration (experts/token = C·k).
The aux losses of every iteration are summed (the per-iteration keys are suffixed `@c` for c ≥ 1).

Shape legend: T tokens, D model width, S assignments.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from routelab.layers.moe import MoELayer
from routelab.routing.base import Router, RoutingContext, RoutingDecision


class ChainOfExpertsLayer(MoELayer):
    """An `MoELayer` run C = 1 + len(extra_routers) times on its own output; `router` routes iteration 1,
    `extra_routers[c-2]` iteration c. `last_decision` holds every iteration's assignments (S = Σ_c S_c), so load and
    experts-per-token statistics count all iterations."""

    def __init__(self, d_model: int, d_ff: int, router: Router, *, extra_routers: list[Router], **kwargs) -> None:
        super().__init__(d_model, d_ff, router, **kwargs)
        for i, r in enumerate(extra_routers):
            if not isinstance(r, Router) or r.d_model != d_model or r.num_experts != router.num_experts:
                raise ValueError(f"extra_routers[{i}] must be a Router with d_model={d_model} and "
                                 f"num_experts={router.num_experts}")
            self.check_schedulable(r)
        self.extra_routers = nn.ModuleList(extra_routers)

    @property
    def iterations(self) -> int:
        return 1 + len(self.extra_routers)

    def forward_with_decision(
        self, x: Tensor, ctx: RoutingContext | None = None, *, router: Router | None = None
    ) -> tuple[Tensor, RoutingDecision]:
        if router is not None:
            raise ValueError("a Chain-of-Experts layer routes with its own routers; `router` cannot replace them")
        current, total, decisions = x, None, []
        for r in [self.router, *self.extra_routers]:
            delta, decision = super().forward_with_decision(current, ctx, router=r)
            decisions.append(decision)
            total = delta if total is None else total + delta
            current = current + delta
        combined = _concat(decisions)
        self.last_decision = combined.detached()
        return total, combined


def _concat(decisions: list[RoutingDecision]) -> RoutingDecision:
    """One decision holding every iteration's assignments; aux losses summed under per-iteration keys; the last
    iteration's state is handed on."""
    if len(decisions) == 1:
        return decisions[0]
    aux = {}
    for c, d in enumerate(decisions):
        for key, loss in d.aux_losses.items():
            aux[key if c == 0 else f"{key}@{c}"] = loss
    first = decisions[0]
    return dataclasses.replace(
        first,
        token_index=torch.cat([d.token_index for d in decisions]),
        expert_index=torch.cat([d.expert_index for d in decisions]),
        weight=torch.cat([d.weight for d in decisions]),
        aux_losses=aux,
        router_logits=None,
        num_dropped=sum(d.num_dropped for d in decisions),
        state=decisions[-1].state,
    )
