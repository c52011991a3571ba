"""Null experts (AdaMoE): k′ slots shared by E true experts and m null experts that cost nothing.

Paper: AdaMoE: Token-Adaptive Routing with Null Experts for Mixture-of-Experts Language Models (Zeng et al., 2024).

Defining property: a token takes 0..k′ true experts — the slots it gives to null experts are free — so a router
that favours nulls lowers the mean compute per token. Null experts never appear in `expert_index`.

Algorithm (authors' code; fp32):
    z = [W x ; W_null x]  (E true + m null logits);  p = softmax(z);  S_t = TopK(p_t, k′)   (ties: lower index)
    T_t = S_t ∩ [0, E):  g_ti = p_ti / Σ_{j∈T_t} p_tj;  no assignments if T_t is empty
    balance loss (coef·(E+m)·Σ f_i P_i over E + m slots, f from slot counts): every null's load fraction is
    replaced by the mean null load, so the nulls act as one bucket and need not balance among themselves.

Options (keyword-only): num_null_experts (m) and k (k′, counting nulls) are required; separate_null_gate=True
(nulls scored by their own `null_gate` Linear(d, m), so `gate` keeps the E rows of a converted model; False: one
`gate` Linear(d, E + m) whose last m rows score the nulls); aux_loss_coef=1e-3 (authors' code). The normalisation
over true experts is fixed.

Follows the authors' code: the extended softmax, the top-k′ over true and null slots, renormalisation over true
picks, the bucketed null load in the balance loss and its coefficient. Our decision: the two gate layouts.
The published m and k′ are not reproduced as defaults (reconstructed; verify): they must be given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._checks import check_bool, check_int, check_number
from routelab.routing._util import flatten_choices, real_mask, top_indices
from routelab.routing.base import Router, RoutingContext, RoutingDecision, router_dtype
from routelab.routing.registry import register_router


def null_balance_loss(probs_TX: Tensor, load_X: Tensor, num_experts: int) -> Tensor:
    """(E+m)·Σ_i f_i P_i over E true and m null slots, the null loads replaced by their mean (unscaled).

    probs_TX: [T, E+m] softmax probabilities; load_X: [E+m] slot counts (true then null).
    """
    X = probs_TX.shape[-1]
    if probs_TX.shape[0] == 0 or int(load_X.sum()) == 0:
        return probs_TX.sum() * 0.0
    f_X = load_X.to(probs_TX.dtype) / load_X.sum()
    if X > num_experts:
        f_X = torch.cat([f_X[:num_experts], f_X[num_experts:].mean().expand(X - num_experts)])
    return X * torch.dot(f_X, probs_TX.mean(dim=0))


@register_router("null_experts")
class NullExpertsRouter(Router):
    """Softmax top-k′ over E true and m null experts; null picks are dropped, true picks renormalised."""

    causal = True

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        num_null_experts: int,
        k: int,
        separate_null_gate: bool = True,
        aux_loss_coef: float = 1e-3,
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        check_int("num_null_experts", num_null_experts, 1)
        check_int("k", k, 1, num_experts + num_null_experts)
        check_bool("separate_null_gate", separate_null_gate)
        check_number("aux_loss_coef", aux_loss_coef, low=0)
        self.num_null_experts, self.k = num_null_experts, k
        self.separate_null_gate = separate_null_gate
        self.aux_loss_coef = float(aux_loss_coef)
        E, m = num_experts, num_null_experts
        self.gate = nn.Linear(d_model, E if separate_null_gate else E + m, bias=False)
        nn.init.normal_(self.gate.weight, std=d_model**-0.5)
        self.null_gate = None
        if separate_null_gate:
            self.null_gate = nn.Linear(d_model, m, bias=False)
            nn.init.normal_(self.null_gate.weight, std=d_model**-0.5)

    def logits(self, x_TD: Tensor) -> Tensor:
        """[T, E+m]: true logits then null logits."""
        dtype = router_dtype(x_TD)
        x_TD = x_TD.to(dtype)
        logits = F.linear(x_TD, self.gate.weight.to(dtype))
        if self.null_gate is not None:
            logits = torch.cat([logits, F.linear(x_TD, self.null_gate.weight.to(dtype))], dim=-1)
        return logits

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        T, E, k = x_TD.shape[0], self.num_experts, self.k
        logits_TX = self.logits(x_TD)
        probs_TX = logits_TX.softmax(dim=-1)
        real_T = real_mask(ctx, T, x_TD.device)

        slot_TK = top_indices(probs_TX.detach(), k)
        true_TK = (slot_TK < E) & real_T[:, None]
        weight_TK = probs_TX.gather(1, slot_TK) * true_TK
        # Tokens whose picks are all null keep no assignment: their zero sum is never divided by.
        weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(weight_TK.dtype).tiny)
        token_S, expert_S, weight_S = flatten_choices(slot_TK, weight_TK, true_TK)

        aux_losses: dict[str, Tensor] = {}
        if self.aux_loss_coef > 0:
            load_X = torch.bincount(slot_TK[real_T].reshape(-1), minlength=logits_TX.shape[-1])
            aux_losses["aux"] = self.aux_loss_coef * null_balance_loss(probs_TX[real_T], load_X, E)
        return RoutingDecision(
            token_index=token_S,
            expert_index=expert_S,
            weight=weight_S,
            num_tokens=T,
            num_experts=E,
            aux_losses=aux_losses,
            router_logits=logits_TX,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_null_experts={self.num_null_experts}, k={self.k}"
