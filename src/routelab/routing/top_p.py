"""Top-p (dynamic-k) routing: each token takes the shortest prefix of its sorted router distribution meeting p.

Papers: Harder Tasks Need More Experts: Dynamic Routing in MoE Models (Huang et al., 2024) — rule "exceed";
UniMoE-Audio — rule "reach", renormalised weights, null and fixed experts; DynMoLE — rule "within", the Tsallis
entropy, the entropy-threshold hybrid and the Tsallis loss.

Defining property: token t takes the experts of a prefix of its probabilities sorted in descending order (ties:
lower index first), of a length set by the rule and clamped into [min_k, max_k]:
    c = cumsum(sorted P)
    exceed: through the first j with c_j > p       (sum > p; without its smallest member ≤ p; p → 0 gives top-1)
    reach:  the shortest prefix with c_j ≥ p
    within: every j with c_j ≤ p                   (may be empty before the min_k floor)
    hybrid (entropy_threshold=τ): tokens whose entropy S(P_t) > τ take every dynamic expert.

Algorithm (fp32): logits z = W x over E true + m null experts (one `gate` Linear(d, E + m); null rows last). The last
`num_fixed` true experts are always selected with weight softmax(z) at their index (their share of the joint
softmax); the rule runs on P = softmax(z) over the dynamic candidates (the other true experts and the nulls).
Null picks take a slot and compute nothing. Weights: normalize="none" keeps P at the picks ("Harder Tasks",
DynMoLE); "selected" divides by the sum of P over the token's dynamic picks, null picks included (UniMoE-Audio).
Losses: aux = coef·Switch loss over the dynamic candidates (f from picks, P mean probability);
dyn = coef·mean_t S(P_t), Shannon or Tsallis S_q = (1 - Σ P_i^q)/(q - 1).

Options (keyword-only) and defaults: p=0.4 (authors' code), rule="exceed", min_k=1, max_k=None (all), normalize=
"none", num_null_experts=0, num_fixed=0, entropy="shannon", tsallis_q=1.1, entropy_threshold=None,
dyn_loss_coef=0.0, aux_loss_coef=1e-2. Presets: "Harder Tasks" p=0.4, exceed, dyn loss Shannon; UniMoE-Audio
(8 routed, 1 null, 2 fixed) p=0.7, reach, "selected"; DynMoLE p=0.75, within, min_k=2, entropy="tsallis",
entropy_threshold=0.9, dyn_loss_coef=0.01.

Follows the authors' code: the three rules, the weights of each paper, the Tsallis entropy and hybrid, DynMoLE's
loss. Our reconstruction: the Shannon loss form and coefficient for "Harder Tasks", how fixed experts share the
softmax, the balance loss over dynamic candidates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._checks import check_choice, check_int, check_number
from routelab.routing._util import flatten_choices, real_mask
from routelab.routing.base import Router, RoutingContext, RoutingDecision, router_dtype
from routelab.routing.losses import switch_balance_loss
from routelab.routing.registry import register_router

RULES = ("exceed", "reach", "within")
NORMALIZATIONS = ("none", "selected")
ENTROPIES = ("shannon", "tsallis")


def prefix_lengths(probs_TN: Tensor, p: float, rule: str) -> Tensor:
    """LongTensor [T]: how many of the sorted probabilities each rule takes (before min_k/max_k)."""
    cum_TN = torch.sort(probs_TN, dim=-1, descending=True, stable=True).values.cumsum(-1)
    n = probs_TN.shape[-1]
    if rule == "exceed":
        return ((cum_TN <= p).sum(-1) + 1).clamp_max(n)
    if rule == "reach":
        return ((cum_TN < p).sum(-1) + 1).clamp_max(n)
    return (cum_TN <= p).sum(-1)


def entropy(probs_TN: Tensor, kind: str, q: float = 1.1) -> Tensor:
    """[T]: Shannon entropy -Σ P log P, or Tsallis (1 - Σ P^q)/(q - 1)."""
    if kind == "shannon":
        return torch.special.entr(probs_TN).sum(-1)
    return (1 - probs_TN.pow(q).sum(-1)) / (q - 1)


@register_router("top_p")
class TopPRouter(Router):
    """Dynamic number of experts per token: the sorted prefix that meets p, by one of three rules."""

    causal = True

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        p: float = 0.4,
        rule: str = "exceed",
        min_k: int = 1,
        max_k: int | None = None,
        normalize: str = "none",
        num_null_experts: int = 0,
        num_fixed: int = 0,
        entropy: str = "shannon",
        tsallis_q: float = 1.1,
        entropy_threshold: float | None = None,
        dyn_loss_coef: float = 0.0,
        aux_loss_coef: float = 1e-2,
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        E = num_experts
        check_number("p", p, low=0, high=1, open_low=True)
        check_choice("rule", rule, RULES)
        check_choice("normalize", normalize, NORMALIZATIONS)
        check_int("num_null_experts", num_null_experts, 0)
        check_int("num_fixed", num_fixed, 0, E - 1)
        n_dyn = E - num_fixed + num_null_experts
        check_int("min_k", min_k, 0, n_dyn)
        if max_k is not None:
            check_int("max_k", max_k, max(min_k, 1), n_dyn)
        check_choice("entropy", entropy, ENTROPIES)
        check_number("tsallis_q", tsallis_q, low=0, open_low=True)
        if tsallis_q == 1:
            raise ValueError("tsallis_q must differ from 1 (q = 1 is the Shannon entropy: use entropy='shannon')")
        if entropy_threshold is not None:
            check_number("entropy_threshold", entropy_threshold, low=0)
        check_number("dyn_loss_coef", dyn_loss_coef, low=0)
        check_number("aux_loss_coef", aux_loss_coef, low=0)
        self.p, self.rule, self.normalize = float(p), rule, normalize
        self.min_k, self.max_k = min_k, n_dyn if max_k is None else max_k
        self.num_null_experts, self.num_fixed = num_null_experts, num_fixed
        self.entropy, self.tsallis_q, self.entropy_threshold = entropy, float(tsallis_q), entropy_threshold
        self.dyn_loss_coef, self.aux_loss_coef = float(dyn_loss_coef), float(aux_loss_coef)
        self.gate = nn.Linear(d_model, E + num_null_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=d_model**-0.5)
        # Dynamic candidates: the non-fixed true experts, then the nulls; ids ≥ E are nulls.
        dyn = list(range(E - num_fixed)) + list(range(E, E + num_null_experts))
        self.register_buffer("_dynamic_ids", torch.tensor(dyn, dtype=torch.long), persistent=False)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        T, E = x_TD.shape[0], self.num_experts
        dtype = router_dtype(x_TD)
        logits_TX = F.linear(x_TD.to(dtype), self.gate.weight.to(dtype))
        dyn_N = self._dynamic_ids
        probs_TN = logits_TX[:, dyn_N].softmax(-1)
        real_T = real_mask(ctx, T, x_TD.device)
        n_dyn = dyn_N.numel()

        with torch.no_grad():
            count_T = prefix_lengths(probs_TN, self.p, self.rule)
            if self.entropy_threshold is not None:
                hot_T = entropy(probs_TN, self.entropy, self.tsallis_q) > self.entropy_threshold
                count_T = torch.where(hot_T, n_dyn, count_T)
            count_T = count_T.clamp(self.min_k, self.max_k)
            order_TN = torch.sort(probs_TN, dim=-1, descending=True, stable=True).indices
            picked_TN = (torch.arange(n_dyn, device=x_TD.device) < count_T[:, None]) & real_T[:, None]
        weight_TN = probs_TN.gather(1, order_TN)
        if self.normalize == "selected":
            total_T = (weight_TN * picked_TN).sum(-1, keepdim=True)
            weight_TN = weight_TN / total_T.clamp_min(torch.finfo(dtype).tiny)
        slot_TN = dyn_N[order_TN]
        load_N = torch.bincount(order_TN[picked_TN], minlength=n_dyn)
        true_TN = picked_TN & (slot_TN < E)
        token_S, expert_S, weight_S = flatten_choices(slot_TN, weight_TN, true_TN)
        if self.num_fixed:
            fixed_F = torch.arange(E - self.num_fixed, E, device=x_TD.device)
            shares_TF = logits_TX.softmax(-1)[:, fixed_F]
            keep_TF = real_T[:, None].expand(T, self.num_fixed)
            fixed = flatten_choices(fixed_F.expand(T, -1), shares_TF, keep_TF)
            token_S, expert_S, weight_S = (torch.cat([a, b]) for a, b in zip((token_S, expert_S, weight_S), fixed))
            order_S = torch.sort(token_S * E + expert_S).indices
            token_S, expert_S, weight_S = token_S[order_S], expert_S[order_S], weight_S[order_S]

        aux_losses: dict[str, Tensor] = {}
        if self.aux_loss_coef > 0:
            aux_losses["aux"] = self.aux_loss_coef * switch_balance_loss(probs_TN[real_T], self.sum_over_group(load_N))
        if self.dyn_loss_coef > 0:
            ent_T = entropy(probs_TN[real_T], self.entropy, self.tsallis_q)
            aux_losses["dyn"] = self.dyn_loss_coef * (ent_T.mean() if ent_T.numel() else ent_T.sum())
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
        return f"{super().extra_repr()}, p={self.p}, rule={self.rule}, min_k={self.min_k}, max_k={self.max_k}"
