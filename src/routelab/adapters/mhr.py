"""MHR: multi-head routing over an inventory of LoRA skills (PEFT's `poly` with n_splits > 1).

Papers: Multi-Head Adapter Routing for Cross-Task Generalization (Caccia et al., NeurIPS 2023); Polytropon (Ponti et
al., 2023) is the n_splits = 1 case. The input features and the output features are cut into n_splits heads; head q
mixes its own slice of every skill's A and B with its own routing weights:
    A_t = [Σ_s w_tqs A_qs]_q  (rows of head q)      B_t = [Σ_s w_tqs B_qs]_q  (columns of head q)
    y = base(x) + (x A_t) B_t · alpha/r
Note the product of mixtures (not a mixture of products, as in MoLoRA): it is PEFT's poly layer exactly
(tests/test_adapters_methods.py compares outputs and gradients against `peft.tuners.poly` with alpha = 1).

Where Poly/MHR route per task (a learned logit table indexed by task id), routelab routes per token: each head has
its own registered token router (d_model = in_features, num_experts = the number of skills). A router whose logits
are only a learned bias (gate weights zero, sigmoid scores, "selected" weights over all skills) reproduces PEFT's
eval-mode task routing for one task. Default router options: k = num_experts (a dense soft mixture, as Poly).
Layout as PEFT: A [n_splits, S, D/n_splits, r], B [n_splits, S, r, O/n_splits]. Runs as two batched matmuls over the
heads (all skills stacked), i.e. the stacked form.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from routelab._checks import check_int
from routelab.adapters._router import build_router
from routelab.adapters.linear import LoRAExperts, init_lora_pair, mean_per_token, router_flops
from routelab.routing.base import RoutingContext, RoutingDecision


class MHRLoRA(LoRAExperts):
    """n_splits heads, each routed over the S = num_experts skills."""

    method = "mhr"

    def __init__(self, in_features: int, out_features: int, *, num_experts: int = 8, r: int = 8, alpha: float = 16,
                 dropout: float = 0.0, router: str = "topk", router_options: dict[str, Any] | None = None,
                 execution: str = "auto", n_splits: int = 4) -> None:
        super().__init__(in_features, out_features, num_experts=num_experts, r=r, alpha=alpha, dropout=dropout)
        check_int("n_splits", n_splits, 1)
        if in_features % n_splits or out_features % n_splits:
            raise ValueError(f"n_splits={n_splits} must divide in_features={in_features} and "
                             f"out_features={out_features}")
        if execution not in ("auto", "stacked"):
            raise ValueError(f"method 'mhr' runs stacked only; execution must be one of 'auto', 'stacked'; "
                             f"got {execution!r}")
        self.n_splits, self.router_name = n_splits, router
        routers = [build_router(router, d_model=in_features, num_experts=num_experts, options=router_options,
                                defaults={"k": num_experts}) for _ in range(n_splits)]
        self.routers = nn.ModuleList(r_ for r_, _ in routers)
        self.router_options = routers[0][1]
        Q, S = n_splits, num_experts
        self.A = nn.Parameter(torch.empty(Q, S, in_features // Q, r))
        self.B = nn.Parameter(torch.empty(Q, S, r, out_features // Q))
        init_lora_pair(self.A.transpose(-1, -2), self.B)  # each A slice Kaiming-uniform as an [r, D/Q] weight

    def options(self) -> dict[str, Any]:
        return {"n_splits": self.n_splits}

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> tuple[Tensor, RoutingDecision]:
        Q, S, Dq, R = self.A.shape
        decisions = [router(x_TD, ctx) for router in self.routers]
        x_TD = self.lora_input(x_TD).to(self.A.dtype)
        T = x_TD.shape[0]
        w_QTS = torch.stack([d.dense_weights() for d in decisions]).to(x_TD.dtype)
        # Down: every head's slice of every skill's A in one batched matmul, then each head's mixture, summed.
        x_QTd = x_TD.view(T, Q, Dq).transpose(0, 1)
        hA_QTSR = torch.bmm(x_QTd, self.A.permute(0, 2, 1, 3).reshape(Q, Dq, S * R)).view(Q, T, S, R)
        h_TR = (hA_QTSR * w_QTS.unsqueeze(-1)).sum(dim=(0, 2)) * self.scale  # alpha/r on the [T, r] side
        # Up: head q's output columns from Σ_s w_tqs h_t B_qs, again one batched matmul over the stacked skills.
        hw_QTX = (w_QTS.unsqueeze(-1) * h_TR.view(1, T, 1, R)).reshape(Q, T, S * R)
        y_QTo = torch.bmm(hw_QTX, self.B.reshape(Q, S * R, -1))
        y_TO = y_QTo.transpose(0, 1).reshape(T, self.out_features)
        return y_TO, merge_head_decisions(decisions, S)

    def adapter_flops(self, decision: RoutingDecision | None) -> float:
        """Per head, the active skills' slices (D/Q and O/Q wide), plus each head's gate."""
        active = 0.0 if decision is None else mean_per_token(decision)  # summed over heads
        logits = 0 if decision is None or decision.router_logits is None else decision.router_logits.shape[1]
        return (2.0 * self.r * (self.in_features + self.out_features) / self.n_splits * active
                + router_flops(self.in_features, logits))


def merge_head_decisions(decisions: list[RoutingDecision], num_skills: int) -> RoutingDecision:
    """One decision over n_splits·S "experts" (head q's skill s is expert q·S + s), for statistics and aux losses."""
    aux: dict[str, Tensor] = {}
    for d in decisions:
        for key, loss in d.aux_losses.items():
            aux[key] = aux[key] + loss if key in aux else loss
    logits = None
    if all(d.router_logits is not None for d in decisions):
        logits = torch.cat([d.router_logits for d in decisions], dim=1)
    return RoutingDecision(
        token_index=torch.cat([d.token_index for d in decisions]),
        expert_index=torch.cat([d.expert_index + q * num_skills for q, d in enumerate(decisions)]),
        weight=torch.cat([d.weight for d in decisions]),
        num_tokens=decisions[0].num_tokens,
        num_experts=num_skills * len(decisions),
        aux_losses=aux,
        router_logits=logits,
        num_dropped=sum(d.num_dropped for d in decisions),
    )
