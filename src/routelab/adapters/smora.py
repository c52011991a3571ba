"""SMoRA: every rank of one LoRA is an expert; each token activates the top-k of its r·E ranks.

Paper: Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-task Learning (Zhao et al.,
2025). Multi-LoRA MoE equals one LoRA with a diagonal block gate, y = base(x) + B · diag(g_t) · A x_t · alpha/r;
SMoRA makes the blocks single ranks.

Defining property: with k = r·E (every rank active) and a uniform router it is exactly one LoRA of rank r·E (and
with any router, one LoRA with B's columns scaled by the gate). The gate of a selected rank is its routing weight
times the number of ranks the token selected, so the gates average 1 when the weights sum to 1 ("selected"
normalisation): a rank's update has the size it would have in the plain LoRA, not 1/k of it (our reconstruction;
the paper's exact gate scaling: verify).

Defaults: router "topk" over the r·E ranks with k = 2·r (the active rank of MoLoRA with top-2 of rank-r experts) and
DeepSeek's loss-free selection bias (balance="loss_free", no aux loss), as the paper balances ranks with a bias
updated from the loads (secondary source; verify). Execution "auto" is stacked: one expert per rank makes the grouped
form a loop of r·E rank-1 matmuls.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from routelab.adapters.linear import grouped_lora, router_flops, stacked_lora
from routelab.adapters.molora import MoLoRA
from routelab.routing.base import RoutingDecision


class SMoRA(MoLoRA):
    """r·E rank-1 experts stored as one LoRA: A [r·E, 1, D], B [r·E, 1, O] (rank i of the LoRA = expert i)."""

    method = "smora"

    def __init__(self, in_features: int, out_features: int, *, num_experts: int = 8, r: int = 8, **kwargs) -> None:
        self._total_rank = num_experts * r
        super().__init__(in_features, out_features, num_experts=num_experts, r=r, **kwargs)
        R = self._total_rank
        self.A = torch.nn.Parameter(self.A.detach().reshape(R, 1, in_features))  # same init, rank-1 experts
        self.B = torch.nn.Parameter(self.B.detach().reshape(R, 1, out_features))
        if kwargs.get("execution", "auto") == "auto":
            self.execution_used = "stacked"

    def num_router_experts(self) -> int:
        return self._total_rank

    def default_router_options(self) -> dict:
        return {"k": 2 * self.r, "balance": "loss_free", "aux_loss_coef": 0.0}

    def mix(self, x_TD: Tensor, decision: RoutingDecision) -> Tensor:
        # gate = weight · (ranks the token selected): mean 1 over a token's ranks under "selected" weights.
        count_S = decision.experts_per_token()[decision.token_index].to(decision.weight.dtype)
        gate_S = decision.weight * count_S * self.scale
        R, _, D = self.A.shape
        if self.execution_used == "stacked":
            gate_TE = gate_S.new_zeros(decision.num_tokens, R).index_put(
                (decision.token_index, decision.expert_index), gate_S, accumulate=True)
            h_TR1 = (x_TD @ self.A.reshape(R, D).T).unsqueeze(-1)
            return stacked_lora(h_TR1, gate_TE, self.B)
        return grouped_lora(x_TD, dataclasses.replace(decision, weight=gate_S), self.A, self.B)

    def adapter_flops(self, decision: RoutingDecision | None) -> float:
        logits = 0 if decision is None or decision.router_logits is None else decision.router_logits.shape[1]
        ranks = 0.0 if decision is None else (decision.num_assignments / max(1, decision.num_tokens))
        return 2.0 * (self.in_features + self.out_features) * ranks + router_flops(self.in_features, logits)
