"""Plain LoRA: the unrouted baseline (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

Defining property: y = base(x) + B A x · alpha/r, exactly PEFT's `LoraConfig` LoRA (same initialisation: A Kaiming
uniform, B = 0). `num_experts` is ignored; no router, no decision. `routelab finetune` sizes its rank so that it
trains the same number of parameters as the routed methods it is compared with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from routelab.adapters.linear import LoRAExperts, init_lora_pair
from routelab.routing.base import RoutingContext, RoutingDecision


class PlainLoRA(LoRAExperts):
    """One LoRA of rank r: A [r, D], B [r, O]."""

    method = "lora"

    def __init__(self, in_features: int, out_features: int, *, num_experts: int = 1, r: int = 8, alpha: float = 16,
                 dropout: float = 0.0, router: str = "topk", router_options: dict[str, Any] | None = None,
                 execution: str = "auto") -> None:
        super().__init__(in_features, out_features, num_experts=1, r=r, alpha=alpha, dropout=dropout)
        if router_options:
            raise ValueError(f"method 'lora' has no router, so router_options must be empty; got {router_options!r}")
        self.A = nn.Parameter(torch.empty(r, in_features))
        self.B = nn.Parameter(torch.empty(r, out_features))
        init_lora_pair(self.A, self.B)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> tuple[Tensor, None]:
        x_TD = self.lora_input(x_TD).to(self.A.dtype)
        return (x_TD @ self.A.T * self.scale) @ self.B, None  # scaled on the [T, r] side: cheaper

    def adapter_flops(self, decision: RoutingDecision | None) -> float:
        return 2.0 * self.r * (self.in_features + self.out_features)
