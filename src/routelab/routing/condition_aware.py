"""Condition-aware routing: the router's scores depend on the diffusion timestep as well as on the token.

Papers: Scaling Diffusion Transformers to 16 Billion Parameters (DiT-MoE, Fei et al., 2024) — MoE FFNs in a
diffusion transformer whose routing sees the timestep-conditioned input; CARE-Edit (condition-aware routing of
experts) — the gate scores tokens together with an embedding of the condition.

Defining property: the logits are z = W x + U e(t), with e(t) a fixed sinusoidal embedding of the token's diffusion
time: the same token is routed differently at different timesteps, and with U = 0 the router is exactly a softmax
top-k router with gate W. A token's routing depends only on itself and its sequence's t (causal per token).

Algorithm (fp32): e(t) = [cos(2π f_j t), sin(2π f_j t)]_j with f_j = 2^j, j = 0..time_dim/2 - 1 (t in [0, 1]);
    z = W x + U e(t);  p = softmax(z);  top-k of p (stable ties → lower index);
    weight = p at the selected experts, renormalised over them (normalize="selected") or not ("none");
    aux = aux_loss_coef · Switch balance loss over p and the selected load.
t is ctx.timestep (one per sequence); without one the router raises.

Options (keyword-only) and defaults: k=2, time_dim=16, normalize="selected", aux_loss_coef=0.01.

Reconstructed (not the authors' code): the linear combination of a token gate and a condition gate, the sinusoidal
embedding with powers-of-two frequencies for t in [0, 1], and the defaults. DiT-MoE feeds the router the adaLN-
modulated token; CARE-Edit's condition is an edit instruction; here the condition is the timestep alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._checks import check_choice, check_int, check_number
from routelab.routing._util import real_mask, switch_aux_losses, token_timesteps, top_k_choices
from routelab.routing.base import Router, RoutingContext, RoutingDecision, router_dtype
from routelab.routing.registry import register_router


def time_features(t_T: Tensor, time_dim: int) -> Tensor:
    """[T, time_dim]: cos and sin of 2π·2^j·t, j = 0..time_dim/2 - 1."""
    freqs = 2.0 ** torch.arange(time_dim // 2, dtype=t_T.dtype, device=t_T.device)
    angles = 2 * math.pi * t_T[:, None] * freqs
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


@register_router("condition_aware")
class ConditionAwareRouter(Router):
    """Softmax top-k over W x + U e(t): token scores plus timestep scores."""

    causal = True
    needs_timestep = True

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        k: int = 2,
        time_dim: int = 16,
        normalize: str = "selected",
        aux_loss_coef: float = 0.01,
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        check_int("k", k, 1, num_experts)
        check_int("time_dim", time_dim, 2)
        if time_dim % 2:
            raise ValueError(f"time_dim must be an even integer >= 2, got {time_dim}")
        check_choice("normalize", normalize, ("none", "selected"))
        check_number("aux_loss_coef", aux_loss_coef, low=0)
        self.k, self.time_dim, self.normalize = k, time_dim, normalize
        self.aux_loss_coef = float(aux_loss_coef)
        self.gate = nn.Linear(d_model, num_experts, bias=False)  # W: the token's scores (gate_rows reads it)
        self.time_gate = nn.Linear(time_dim, num_experts, bias=False)  # U: the timestep's scores
        nn.init.normal_(self.gate.weight, std=d_model**-0.5)
        nn.init.normal_(self.time_gate.weight, std=time_dim**-0.5)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        T, E = x_TD.shape[0], self.num_experts
        dtype = router_dtype(x_TD)
        t_T = token_timesteps(ctx, T, x_TD.device, router="condition_aware").to(dtype)
        logits_TE = F.linear(x_TD.to(dtype), self.gate.weight.to(dtype)) + F.linear(
            time_features(t_T, self.time_dim), self.time_gate.weight.to(dtype)
        )
        probs_TE = logits_TE.softmax(-1)
        real_T = real_mask(ctx, T, x_TD.device)
        token_S, expert_S, weight_S = top_k_choices(probs_TE, self.k, real_T,
                                                    renormalize=self.normalize == "selected")
        return RoutingDecision(
            token_index=token_S,
            expert_index=expert_S,
            weight=weight_S,
            num_tokens=T,
            num_experts=E,
            aux_losses=switch_aux_losses(self.aux_loss_coef, probs_TE, expert_S, real_T, self),
            router_logits=logits_TE,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, time_dim={self.time_dim}, normalize={self.normalize}"
