"""Cosine routing: cosine similarity to learned centroids in a low-dimensional space, with a learned temperature.

Paper: Equifinality in Mixture of Experts: Routing Topology Does Not Determine Language Modeling Quality.

Defining property: the router scores cos(P x, c_e) in a d_space-dimensional space, so routing is invariant to the
scale of x (route(αx) = route(x) for α > 0) and to the scale of each centroid; it holds d_space·d + d_space·E + 1
parameters (5.33× fewer than a linear router at d = 512, E = 1024).

Algorithm (fp32):
    q_t = P x_t  (P: Linear(d, d_space), no bias);  s_te = cos(q_t, c_e);  p_t = softmax(|τ|·s_t) over all experts
    S_t = TopK(p_t, k);  weight = p at S_t, renormalised over S_t when k > 1 (raw p when k = 1, so the task loss
    reaches P, the centroids and τ)
Options (keyword-only) and defaults: d_space=64, k=1, temperature_init=10.0, centroid_init="orthogonal" | "normal",
aux_loss_coef=1e-2 (the Switch loss on p; a routelab default, as for `topk`; 0 disables).

Follows the paper: cosine to centroids in a 64-dimensional space, rank-1 experts in the paper's setting (here any
expert bank). Our reconstruction (secondary sources): the projection P, the temperature τ ≈ 10 and its |·|, the
softmax before top-k, orthogonal centroid init. Multi-hop routing and relative-norm halting are not implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._checks import check_choice, check_int, check_number
from routelab.routing._util import real_mask, switch_aux_losses, top_k_choices
from routelab.routing.base import Router, RoutingContext, RoutingDecision, router_dtype
from routelab.routing.registry import register_router

CENTROID_INITS = ("orthogonal", "normal")


@register_router("cosine")
class CosineRouter(Router):
    """softmax(|τ|·cos(P x, c_e)) → top-k."""

    causal = True

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        d_space: int = 64,
        k: int = 1,
        temperature_init: float = 10.0,
        centroid_init: str = "orthogonal",
        aux_loss_coef: float = 1e-2,
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        check_int("d_space", d_space, 1)
        check_int("k", k, 1, num_experts)
        check_number("temperature_init", temperature_init, low=0, open_low=True)
        check_choice("centroid_init", centroid_init, CENTROID_INITS)
        check_number("aux_loss_coef", aux_loss_coef, low=0)
        self.d_space, self.k, self.aux_loss_coef = d_space, k, float(aux_loss_coef)
        self.proj = nn.Linear(d_model, d_space, bias=False)
        nn.init.normal_(self.proj.weight, std=d_model**-0.5)
        self.centroids = nn.Parameter(torch.empty(num_experts, d_space))
        if centroid_init == "orthogonal":
            nn.init.orthogonal_(self.centroids)
        else:
            nn.init.normal_(self.centroids, std=d_space**-0.5)
        self.temperature = nn.Parameter(torch.tensor(float(temperature_init)))

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        T, E, k = x_TD.shape[0], self.num_experts, self.k
        dtype = router_dtype(x_TD)
        q_TR = F.linear(x_TD.to(dtype), self.proj.weight.to(dtype))
        cos_TE = F.normalize(q_TR, dim=-1) @ F.normalize(self.centroids.to(dtype), dim=-1).T
        logits_TE = self.temperature.to(dtype).abs() * cos_TE
        probs_TE = logits_TE.softmax(-1)
        real_T = real_mask(ctx, T, x_TD.device)

        token_S, expert_S, weight_S = top_k_choices(probs_TE, k, real_T, renormalize=k > 1)
        aux_losses = switch_aux_losses(self.aux_loss_coef, probs_TE, expert_S, real_T, self)
        return RoutingDecision(
            token_index=token_S,
            expert_index=expert_S,
            weight=weight_S,
            num_tokens=T,
            num_experts=E,
            aux_losses=aux_losses,
            router_logits=logits_TE,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, d_space={self.d_space}, k={self.k}"
