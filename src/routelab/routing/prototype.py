"""Prototypical routing with a routing contrastive loss (ProMoE).

Paper: Wei et al., "Routing Matters in MoE: Scaling Diffusion Transformers with Explicit Routing Guidance" (ProMoE,
2025).

Defining property: each expert e owns a learnable prototype p_e; a token is routed by its cosine similarity to the
prototypes, so routing is invariant to the scale of every prototype (route with α_e·p_e, α_e > 0, is the same
decision and the same weights) and of the token. The routing contrastive loss (RCL) pulls each expert's prototype
towards the tokens routed to it and away from the other experts' tokens (intra-expert coherence, inter-expert
diversity).

Algorithm (fp32):
    s_te = cos(x_t, p_e);  logits = τ·s;  probs_t = softmax(logits_t);  S_t = TopK(probs_t, k)
    weight = probs at S_t, renormalised over S_t when k > 1 (raw when k = 1, so the task loss reaches p)
    RCL (training, rcl_coef > 0): for each expert e that is some real token's first choice, the centroid
        c_e = mean of x̂_t = x_t/|x_t| over those tokens;
        L_RCL = -(1/|active|) Σ_e log( exp(cos(c_e, p_e)/τ_c) / Σ_j exp(cos(c_e, p_j)/τ_c) )
    aux_losses: {"rcl": rcl_coef·L_RCL} (+ {"aux": Switch balance loss} when aux_loss_coef > 0).
Options (keyword-only) and defaults: k=2, temperature=10.0 (τ), rcl_coef=1e-2, rcl_temperature=0.1 (τ_c),
aux_loss_coef=1e-2.

Reconstruction: the paper's router first splits image tokens by their role under classifier-free guidance
(conditional / unconditional tokens, the latter sent to their own experts), then routes the conditional tokens by
prototype similarity. A language model has no unconditional tokens, so **the conditional split is dropped** here:
every token is routed by prototypes. The exact form of the RCL (anchor = the per-expert centroid of routed tokens,
positive = its own prototype, negatives = the other prototypes, InfoNCE with temperature τ_c) and the fixed τ are
ours, from the paper's description; the RCL couples the tokens of a batch, but only through the loss: routing
decisions stay per token (causal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._checks import check_int, check_number
from routelab.routing._util import real_mask, switch_aux_losses, top_k_choices
from routelab.routing.base import Router, RoutingContext, RoutingDecision, router_dtype
from routelab.routing.registry import register_router


@register_router("prototype")
class PrototypeRouter(Router):
    """softmax(τ·cos(x, p_e)) → top-k, with ProMoE's routing contrastive loss on the prototypes."""

    causal = True

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        k: int = 2,
        temperature: float = 10.0,
        rcl_coef: float = 1e-2,
        rcl_temperature: float = 0.1,
        aux_loss_coef: float = 1e-2,
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        check_int("k", k, 1, num_experts)
        check_number("temperature", temperature, low=0, open_low=True)
        check_number("rcl_coef", rcl_coef, low=0)
        check_number("rcl_temperature", rcl_temperature, low=0, open_low=True)
        check_number("aux_loss_coef", aux_loss_coef, low=0)
        self.k, self.temperature = k, float(temperature)
        self.rcl_coef, self.rcl_temperature, self.aux_loss_coef = float(rcl_coef), float(rcl_temperature), \
            float(aux_loss_coef)
        self.prototypes = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.prototypes, std=d_model**-0.5)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        T, E, k = x_TD.shape[0], self.num_experts, self.k
        dtype = router_dtype(x_TD)
        xhat_TD = F.normalize(x_TD.to(dtype), dim=-1)
        phat_ED = F.normalize(self.prototypes.to(dtype), dim=-1)
        logits_TE = self.temperature * (xhat_TD @ phat_ED.T)
        probs_TE = logits_TE.softmax(-1)
        real_T = real_mask(ctx, T, x_TD.device)
        token_S, expert_S, weight_S = top_k_choices(probs_TE, k, real_T, renormalize=k > 1)
        aux_losses = switch_aux_losses(self.aux_loss_coef, probs_TE, expert_S, real_T, self)
        if self.training and self.rcl_coef > 0 and bool(real_T.any()):
            first_T = logits_TE.detach().argmax(-1)  # each token's first choice (ties: lower index)
            aux_losses["rcl"] = self.rcl_coef * routing_contrastive_loss(
                xhat_TD[real_T], first_T[real_T], phat_ED, self.rcl_temperature
            )
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
        return f"{super().extra_repr()}, k={self.k}, temperature={self.temperature}"


def routing_contrastive_loss(xhat_ND: Tensor, expert_N: Tensor, phat_ED: Tensor, temperature: float) -> Tensor:
    """InfoNCE of each active expert's centroid (mean of its unit-norm tokens) against the unit-norm prototypes,
    its own prototype the positive: -mean_e log softmax_j(cos(c_e, p_j)/τ)[e] over experts with ≥ 1 token."""
    E = phat_ED.shape[0]
    counts_E = torch.bincount(expert_N, minlength=E)
    sums_ED = xhat_ND.new_zeros(E, xhat_ND.shape[1]).index_add(0, expert_N, xhat_ND)
    active_E = counts_E > 0
    centroids_AD = sums_ED[active_E] / counts_E[active_E, None].to(xhat_ND.dtype)
    logits_AE = F.normalize(centroids_AD, dim=-1) @ phat_ED.T / temperature
    own_A = torch.arange(E, device=expert_N.device)[active_E]
    return F.cross_entropy(logits_AE, own_A)
