"""Random-fixed routing: a linear softmax top-k router drawn from a seed, then frozen.

Paper: Equifinality in Mixture of Experts: Routing Topology Does Not Determine Language Modeling Quality (the
random-fixed baseline).

Defining property: no trainable parameters — the gate is a buffer drawn from `seed` (the same in any process) — so
training changes no decision; routing is a fixed function of x.

Algorithm: W ~ N(0, 1/d) from torch.Generator().manual_seed(seed) (a buffer, saved with the model);
p = softmax(W x) in fp32; S_t = TopK(p_t, k); weight = p at S_t ("none") or renormalised ("selected").

Options (keyword-only) and defaults: seed=0, k=1, normalize="none".

Our reconstruction: the distribution of W and the softmax top-k form (the paper says only random and frozen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from routelab._checks import check_choice, check_int
from routelab.routing._util import real_mask, top_k_choices
from routelab.routing.base import Router, RoutingContext, RoutingDecision, router_dtype
from routelab.routing.registry import register_router


@register_router("random_fixed")
class RandomFixedRouter(Router):
    """A frozen random linear router: softmax top-k over W x, W a seeded buffer."""

    causal = True

    def __init__(self, *, d_model: int, num_experts: int, seed: int = 0, k: int = 1, normalize: str = "none") -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        check_int("seed", seed, 0)
        check_int("k", k, 1, num_experts)
        check_choice("normalize", normalize, ("none", "selected"))
        self.seed, self.k, self.normalize = seed, k, normalize
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(num_experts, d_model, generator=generator) * d_model**-0.5
        self.register_buffer("gate_weight", weight)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        T, E, k = x_TD.shape[0], self.num_experts, self.k
        dtype = router_dtype(x_TD)
        logits_TE = F.linear(x_TD.to(dtype), self.gate_weight.to(dtype))
        probs_TE = logits_TE.softmax(-1)
        real_T = real_mask(ctx, T, x_TD.device)
        token_S, expert_S, weight_S = top_k_choices(probs_TE, k, real_T, renormalize=self.normalize == "selected")
        return RoutingDecision(
            token_index=token_S,
            expert_index=expert_S,
            weight=weight_S,
            num_tokens=T,
            num_experts=E,
            router_logits=logits_TE,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}, k={self.k}"
