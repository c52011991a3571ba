"""HydraLoRA: one shared down-projection A, E routed up-projections B_e.

Paper: HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning (Tian et al., NeurIPS 2024).

Defining property: a single A [r, D] for all experts (the "hydra" has one body): y = base(x) + Σ_{e ∈ S_t} w_te ·
B_e (A x_t) · alpha/r. The paper mixes all B's with softmax weights; here any registered router chooses them (topk
with k = num_experts reproduces the paper's dense mixture), so top-k sparse heads come for free.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from routelab.adapters.linear import grouped_lora, init_lora_pair, mean_per_token, router_flops, stacked_lora
from routelab.adapters.molora import MoLoRA, scaled
from routelab.routing.base import RoutingDecision


class HydraLoRA(MoLoRA):
    """A [r, D] shared; B [E, r, O]."""

    method = "hydra"

    def __init__(self, in_features: int, out_features: int, **kwargs) -> None:
        super().__init__(in_features, out_features, **kwargs)
        self.A = nn.Parameter(torch.empty(self.r, in_features))
        init_lora_pair(self.A, self.B)

    def mix(self, x_TD: Tensor, decision: RoutingDecision) -> Tensor:
        h_TR = x_TD @ self.A.T  # the shared down-projection, once per token
        if self.execution_used == "stacked":
            E = self.num_experts
            return stacked_lora(h_TR.unsqueeze(1).expand(-1, E, -1), decision.dense_weights() * self.scale, self.B)
        return grouped_lora(h_TR, scaled(decision, self.scale), None, self.B)

    def adapter_flops(self, decision: RoutingDecision | None) -> float:
        logits = 0 if decision is None or decision.router_logits is None else decision.router_logits.shape[1]
        ept = 0.0 if decision is None else mean_per_token(decision)
        return (2.0 * self.r * self.in_features + 2.0 * self.r * self.out_features * ept
                + router_flops(self.in_features, logits))
