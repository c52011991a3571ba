"""FlyLoRA: an implicit rank-wise mixture of experts with a frozen sparse random down-projection.

Paper: FlyLoRA: Boosting Task Decoupling and Parameter Efficiency via Implicit Rank-Wise Mixture-of-Experts (Zou et al.,
NeurIPS 2025), inspired by the fly olfactory circuit. Follows the authors' code (gfyddha/FlyLoRA): A [R, D] is a
fixed random matrix whose every row has exactly p = max(1, round(D·sparsity)) non-zeros drawn from N(0, 1/R²), with
sparsity = k/R by default; the k ranks with the largest |A x + d| are active with weight 1; d is a per-rank bias moved
by bias_update_rate·sign(mean load - load) (DeepSeek's loss-free balancing, applied here once per optimizer step by
`routelab.update_routers`, not inside the forward as in the authors' code); y = base(x) + B (mask ⊙ A x) · alpha/r.

Defining property: no learned router; A is a buffer (never trained, never changed) with the stated sparsity, and
A x itself chooses the ranks. R = r·E ranks in all; k (default 2·r, the active rank of MoLoRA with top-2) active.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from routelab._checks import check_int, check_number
from routelab.adapters.linear import LoRAExperts, init_lora_pair, stacked_lora
from routelab.routing._util import top_indices
from routelab.routing.base import Router, RoutingContext, RoutingDecision


class FlyRouter(Router):
    """Top-k of |A x + d| over the R ranks of a frozen sparse random projection A; weight 1 for every pick.

    Not in the router registry: it is FlyLoRA's down-projection as much as a router, and lives in its adapter.
    Buffers: projection [R, D] (A), expert_bias [R] (d).
    """

    causal = True

    def __init__(self, *, d_model: int, num_experts: int, k: int, sparsity: float, bias_update_rate: float) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        R = num_experts
        check_int("k", k, 1, R)
        check_number("sparsity", sparsity, low=0, high=1, open_low=True)
        check_number("bias_update_rate", bias_update_rate, low=0)
        self.k, self.sparsity, self.bias_update_rate = k, float(sparsity), float(bias_update_rate)
        self.nonzeros_per_row = max(1, round(d_model * sparsity))
        A = torch.zeros(R, d_model)
        for i in range(R):
            cols = torch.randperm(d_model)[: self.nonzeros_per_row]
            A[i, cols] = torch.randn(self.nonzeros_per_row) / R
        self.register_buffer("projection", A)
        self.register_buffer("expert_bias", torch.zeros(R))
        self.register_buffer("_pending_load", torch.zeros(R, dtype=torch.float64), persistent=False)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        return self.route_projected(x_TD @ self.projection.to(x_TD.dtype).T)

    def route_projected(self, h_TR: Tensor) -> RoutingDecision:
        """The decision from the projected rows h = A x (computed once by the adapter and reused)."""
        T, k = h_TR.shape[0], self.k
        choice_TR = (h_TR.detach().float() + self.expert_bias).abs()
        rank_TK = top_indices(choice_TR, k)
        expert_S = rank_TK.reshape(-1)
        if self.training and torch.is_grad_enabled():
            self._pending_load += torch.bincount(expert_S, minlength=self.num_experts).double()
        return RoutingDecision(
            token_index=torch.arange(T, device=h_TR.device).repeat_interleave(k),
            expert_index=expert_S,
            weight=h_TR.new_ones(T * k),
            num_tokens=T,
            num_experts=self.num_experts,
        )

    @torch.no_grad()
    def apply_updates(self) -> None:
        load_R = self._pending_load
        if load_R.sum() > 0:
            self.expert_bias += (torch.sign(load_R.mean() - load_R) * self.bias_update_rate).to(self.expert_bias.dtype)
        load_R.zero_()


class FlyLoRA(LoRAExperts):
    """R = r·E ranks: the frozen FlyRouter projection as A, trainable B [R, 1, O]."""

    method = "flylora"

    def __init__(self, in_features: int, out_features: int, *, num_experts: int = 8, r: int = 8, alpha: float = 16,
                 dropout: float = 0.0, router: str = "topk", router_options: dict[str, Any] | None = None,
                 execution: str = "auto", k: int | None = None, sparsity: float | None = None,
                 bias_update_rate: float = 1e-3) -> None:
        super().__init__(in_features, out_features, num_experts=num_experts, r=r, alpha=alpha, dropout=dropout)
        if router != "topk" or router_options:
            raise ValueError("method 'flylora' has no learned router (A x chooses the ranks); leave router and "
                             "router_options unset and give method_options k, sparsity, bias_update_rate")
        if execution not in ("auto", "stacked"):
            raise ValueError(f"method 'flylora' runs stacked only (A x is computed for routing anyway); "
                             f"execution must be one of 'auto', 'stacked'; got {execution!r}")
        R = num_experts * r
        k = 2 * r if k is None else k
        check_int("k (flylora: active ranks)", k, 1, R)
        sparsity = k / R if sparsity is None else sparsity
        self.router = FlyRouter(d_model=in_features, num_experts=R, k=k, sparsity=sparsity,
                                bias_update_rate=bias_update_rate)
        self.k = k
        self.B = nn.Parameter(torch.empty(R, 1, out_features))
        init_lora_pair(torch.empty(1, 1, 1), self.B)

    @property
    def A(self) -> Tensor:
        return self.router.projection

    def options(self) -> dict[str, Any]:
        return {"k": self.k, "sparsity": self.router.sparsity, "bias_update_rate": self.router.bias_update_rate}

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> tuple[Tensor, RoutingDecision]:
        A = self.A.to(self.B.dtype)
        h_TR = x_TD.to(A.dtype) @ A.T
        decision = self.router.route_projected(h_TR)
        if self.dropout_p > 0:
            h_TR = self.lora_input(x_TD).to(A.dtype) @ A.T
        return stacked_lora(h_TR.unsqueeze(-1), decision.dense_weights() * self.scale, self.B), decision

    def adapter_flops(self, decision: RoutingDecision | None) -> float:
        """The sparse down-projection (p non-zeros a row, all R rows: it also routes) and k active up-projections."""
        R = self.num_experts * self.r
        return 2.0 * R * self.router.nonzeros_per_row + 2.0 * self.k * self.out_features
