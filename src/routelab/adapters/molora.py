"""MoLoRA: top-k routed LoRA experts with a balance loss.

Papers: LLaVA-MoLE (Chen et al., 2024: sparse top-k mixture of LoRA experts in the FFN of an LLM); MixLoRA (Li et al.,
2024) and MoLoRA (Zadouri et al., 2023, "Pushing Mixture of Experts to the Limit"); DynMoLE (2025) is this method
with `router="top_p"` and its Tsallis options.

Defining property: each token's update is Σ_{e ∈ S_t} w_te · B_e A_e x_t · alpha/r, with S_t and w from any registered
token router built with d_model = in_features (so top-k, top_p/DynMoLE, null experts, expert choice... work
unchanged); with one expert, k = 1 and weight 1 it is exactly PEFT's LoRA (tests/test_adapters_peft.py).

Execution: in the stacked form, a router that declares a linear gate (`Router.logit_gate()`, e.g. "topk") gets its
logits from the down-projection's matmul, x @ [A_1..A_E | W_gate]ᵀ, through `Router.route_logits` (the same decision,
losses and gradients as its own forward; tests/test_adapters_execution.py); other routers run their own forward.

Defaults: router "topk" with its defaults (k=2, "selected" weights, Switch balance loss 1e-2); A_e Kaiming-uniform
like an nn.Linear, B_e = 0 (PEFT's initialisation: the wrapped model starts equal to its base).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab.adapters._router import build_router
from routelab.adapters.linear import (
    LoRAExperts,
    grouped_lora,
    init_lora_pair,
    mean_per_token,
    resolve_execution,
    router_flops,
    stacked_lora,
)
from routelab.routing.base import RoutingContext, RoutingDecision, router_dtype


class MoLoRA(LoRAExperts):
    """E LoRA experts of rank r: A [E, r, D], B [E, r, O] (B stored transposed so both stack as views)."""

    method = "molora"

    def __init__(self, in_features: int, out_features: int, *, num_experts: int = 8, r: int = 8, alpha: float = 16,
                 dropout: float = 0.0, router: str = "topk", router_options: dict[str, Any] | None = None,
                 execution: str = "auto") -> None:
        super().__init__(in_features, out_features, num_experts=num_experts, r=r, alpha=alpha, dropout=dropout)
        self.router_name = router
        self.router, self.router_options = build_router(
            router, d_model=in_features, num_experts=self.num_router_experts(), options=router_options,
            defaults=self.default_router_options())
        self.execution = execution
        self.execution_used = resolve_execution(execution, num_experts * r)
        self.A = nn.Parameter(torch.empty(num_experts, r, in_features))
        self.B = nn.Parameter(torch.empty(num_experts, r, out_features))
        init_lora_pair(self.A, self.B)

    def num_router_experts(self) -> int:
        return self.num_experts

    def default_router_options(self) -> dict[str, Any]:
        """Router options a method fills in where the user gives none (MoLoRA: the router's own defaults)."""
        return {}

    def options(self) -> dict[str, Any]:
        return {}

    def route(self, x_TD: Tensor, ctx: RoutingContext | None) -> RoutingDecision:
        return self.router(x_TD, ctx)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> tuple[Tensor, RoutingDecision]:
        gate = self.fused_gate(x_TD)
        if gate is None:
            decision = self.route(x_TD, ctx)
            lora_x_TD = self.lora_input(x_TD).to(self.A.dtype)
            return self.mix(lora_x_TD, decision), decision
        # The router's logits come out of the down-projection's matmul (x @ [A_1..A_E | W_gate]ᵀ): one [T, E·R + E]
        # matmul forward and two backward instead of a second, skinny set for the gate, which cost about half the
        # router's time at T=4096, D=512, E=8 (benchmarks/lora.py).
        weight_GD, bias_G = gate
        E, R, D = self.A.shape
        # split, not two slices: its backward is one cat, where slices' would zero-fill and add [T, E·R + E] twice.
        h_TX, logits_TG = F.linear(x_TD, torch.cat((self.A.reshape(E * R, D), weight_GD))).split(
            (E * R, weight_GD.shape[0]), dim=1)
        if bias_G is not None:
            logits_TG = logits_TG + bias_G
        decision = self.router.route_logits(x_TD, logits_TG, ctx)
        h_TER = h_TX.view(-1, E, R)
        # alpha/r on the [S] weights, before densifying: one pass over T·k values instead of over [T, E].
        return stacked_lora(h_TER, scaled(decision, self.scale).dense_weights(), self.B), decision

    def fused_gate(self, x_TD: Tensor) -> tuple[Tensor, Tensor | None] | None:
        """The router's linear gate (`Router.logit_gate()`) when forward computes its logits in the down-projection's
        matmul, else None. Only where that computes what the unfused path does: MoLoRA's own routing and stacked
        mixing (subclasses that override `route` or `mix` change what the logits or A mean), no dropout active on
        the LoRA input (the router sees the undropped input), and x, A and the gate all in the router's dtype."""
        if type(self).route is not MoLoRA.route or type(self).mix is not MoLoRA.mix:
            return None
        if self.execution_used != "stacked" or (self.training and self.dropout_p > 0):
            return None
        gate = self.router.logit_gate()
        if gate is None or not x_TD.dtype == router_dtype(x_TD) == self.A.dtype == gate[0].dtype:
            return None
        return gate

    def mix(self, x_TD: Tensor, decision: RoutingDecision) -> Tensor:
        """Σ_{(t,e)} w · B_e A_e x_t · alpha/r, in the configured execution (alpha/r folded into the weights: a
        [T, E] or [S] multiply instead of one over the [T, O] output)."""
        E, R, D = self.A.shape
        if self.execution_used == "stacked":
            h_TER = (x_TD @ self.A.reshape(E * R, D).T).view(-1, E, R)
            return stacked_lora(h_TER, scaled(decision, self.scale).dense_weights(), self.B)
        return grouped_lora(x_TD, scaled(decision, self.scale), self.A, self.B)

    def adapter_flops(self, decision: RoutingDecision | None) -> float:
        """Active adapter FLOPs per token: each assignment runs one rank-r LoRA (2·r·(D+O)), plus the gate."""
        logits = 0 if decision is None or decision.router_logits is None else decision.router_logits.shape[1]
        ept = 0.0 if decision is None else mean_per_token(decision)
        return 2.0 * self.r * (self.in_features + self.out_features) * ept + router_flops(self.in_features, logits)


def scaled(decision: RoutingDecision, factor: float) -> RoutingDecision:
    """The decision with its weights multiplied by `factor` (the LoRA scaling, applied where it is cheapest)."""
    return dataclasses.replace(decision, weight=decision.weight * factor)
