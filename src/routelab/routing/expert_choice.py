"""Expert-choice routing: each expert picks its C highest-scoring tokens, so every expert is exactly balanced.

Papers: Mixture-of-Experts with Expert Choice Routing (Zhou et al., 2022); Expert Choice for diffusion language
models (the post-softmax variant and the timestep-dependent capacity schedules).

Defining property: every expert takes exactly C tokens per scope unit (C_b per sample under a schedule), C ≥ 1;
a token gets 0..E experts, E·C/n ≈ k on average. Not causal: a later token can take an earlier token's place.

Algorithm (logits z = W x in fp32):
    gating="pre_softmax"  (Zhou):      s = softmax(z) over experts; expert e takes the top-C tokens of s[:, e];
                                       weight = s[t, e]
    gating="post_softmax" (diffusion): top-C tokens of raw z[:, e]; weight = softmax of z over the token's
                                       picking experts (a picked token's weights sum to 1)
    gating="sigmoid":                  top-C tokens of raw z[:, e]; weight = sigmoid(z[t, e])
    C = max(floor(n·capacity_factor/E), 1), n real tokens in the scope unit (capped at n)
    schedule φ over the mask ratio r = ctx.timestep (one per sample):
        k(r) = clamp(round(k_min + (k_max - k_min)·φ(r)), k_min, k_max);  C_b = max(floor(L·k(r_b)/E), 1)
        φ: linear r | cosine (1 - cos πr)/2 | bell 1 - 4(r - ½)²
           | bell_gaussian (exp(-(r-½)²/(2w²)) - exp(-1/(8w²))) / (1 - exp(-1/(8w²)))
           | linear_reverse, cosine_reverse, bell_gaussian_reverse: 1 - φ
Ties between tokens go to the earlier token. Padding is never picked and does not count in n.

Options (keyword-only) and defaults: capacity_factor=2.0 (k, the mean experts per token; Zhou's main setting);
gating="pre_softmax"; scope="sequence" (per sequence of ctx.batch_shape; a 2-D input is one sequence) | "batch";
schedule=None; k_min=None, k_max=None (both required with a schedule); bell_width=0.2; z_loss_coef=0.0 (the
diffusion preset uses 1e-3). No balance loss: balance holds by construction.

Follows the authors' code: the diffusion variant (post-softmax, sigmoid), the schedules, the per-sample capacity.
Our reconstruction: Zhou's formulas (from the paper and secondary sources), the floor-then-max(·, 1) capacity for
Zhou's variant, the tie-break, and the handling of padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._checks import check_choice, check_int, check_number
from routelab.routing._util import real_mask, sequence_shape
from routelab.routing.base import Router, RoutingContext, RoutingDecision, router_dtype
from routelab.routing.losses import router_z_loss
from routelab.routing.registry import register_router

GATINGS = ("pre_softmax", "post_softmax", "sigmoid")
SCOPES = ("sequence", "batch")
SCHEDULES = (
    "linear",
    "cosine",
    "bell",
    "bell_gaussian",
    "linear_reverse",
    "cosine_reverse",
    "bell_gaussian_reverse",
)


def schedule_phi(name: str, r: Tensor, bell_width: float = 0.2) -> Tensor:
    """φ(r) in [0, 1] for a mask ratio r in [0, 1] (elementwise)."""
    base = name.removesuffix("_reverse")
    if base == "linear":
        phi = r
    elif base == "cosine":
        phi = (1 - torch.cos(math.pi * r)) / 2
    elif base == "bell":
        phi = 1 - 4 * (r - 0.5) ** 2
    elif base == "bell_gaussian":
        w2 = bell_width**2
        floor = math.exp(-1 / (8 * w2))
        phi = (torch.exp(-((r - 0.5) ** 2) / (2 * w2)) - floor) / (1 - floor)
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    return 1 - phi if name.endswith("_reverse") else phi


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """Each expert picks its top-C tokens per sequence (or per batch)."""

    causal = False

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        capacity_factor: float = 2.0,
        gating: str = "pre_softmax",
        scope: str = "sequence",
        schedule: str | None = None,
        k_min: int | None = None,
        k_max: int | None = None,
        bell_width: float = 0.2,
        z_loss_coef: float = 0.0,
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        E = num_experts
        check_number("capacity_factor", capacity_factor, low=0, high=E, open_low=True)
        check_choice("gating", gating, GATINGS)
        check_choice("scope", scope, SCOPES)
        if schedule is not None:
            check_choice("schedule", schedule, SCHEDULES)
            if scope != "sequence":
                raise ValueError('schedule needs scope="sequence" (capacity is set per sample)')
            check_int("k_min", k_min, 1, E)
            check_int("k_max", k_max, k_min, E)
        elif k_min is not None or k_max is not None:
            raise ValueError("k_min and k_max are only used with a schedule; set schedule= or leave them None")
        check_number("bell_width", bell_width, low=0, open_low=True)
        check_number("z_loss_coef", z_loss_coef, low=0)
        self.capacity_factor = float(capacity_factor)
        self.gating, self.scope, self.schedule = gating, scope, schedule
        self.k_min, self.k_max, self.bell_width = k_min, k_max, float(bell_width)
        self.z_loss_coef = float(z_loss_coef)
        self.gate = nn.Linear(d_model, E, bias=False)
        nn.init.normal_(self.gate.weight, std=d_model**-0.5)

    def capacities(self, real_BL: Tensor, ctx: RoutingContext | None) -> Tensor:
        """LongTensor [B]: tokens each expert takes in each scope unit."""
        B, L = real_BL.shape
        E = self.num_experts
        n_B = real_BL.sum(-1)
        if self.schedule is None:
            cap_B = torch.floor(n_B.double() * self.capacity_factor / E).long().clamp_min(1)
        else:
            if ctx is None or ctx.timestep is None:
                raise ValueError(f"expert_choice with schedule={self.schedule!r} needs RoutingContext.timestep")
            r_B = torch.as_tensor(ctx.timestep, dtype=torch.float64).reshape(-1).to(real_BL.device)
            if r_B.numel() == 1:
                r_B = r_B.expand(B)
            if r_B.numel() != B:
                raise ValueError(f"RoutingContext.timestep has {r_B.numel()} values for {B} sequences")
            phi_B = schedule_phi(self.schedule, r_B.clamp(0, 1), self.bell_width)
            k_B = torch.round(self.k_min + (self.k_max - self.k_min) * phi_B).clamp(self.k_min, self.k_max)
            cap_B = torch.floor(L * k_B / E).long().clamp_min(1)
        return torch.minimum(cap_B, n_B)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        T, E = x_TD.shape[0], self.num_experts
        dtype = router_dtype(x_TD)
        logits_TE = F.linear(x_TD.to(dtype), self.gate.weight.to(dtype))
        B, L = sequence_shape(ctx, T) if self.scope == "sequence" else (1, T)
        real_T = real_mask(ctx, T, x_TD.device)
        probs_TE = logits_TE.softmax(-1) if self.gating == "pre_softmax" else None
        key_TE = (probs_TE if probs_TE is not None else logits_TE).detach()

        cap_B = self.capacities(real_T.view(B, L), ctx)
        # Experts rank the tokens of their scope unit; padding ranks last (selection only, never normalised).
        key_BEL = key_TE.masked_fill(~real_T[:, None], float("-inf")).view(B, L, E).transpose(1, 2)
        order_BEL = torch.sort(key_BEL, dim=-1, descending=True, stable=True).indices
        picked_BEL = (torch.arange(L, device=x_TD.device) < cap_B[:, None, None]).expand(B, E, L)
        token_BEL = order_BEL + (torch.arange(B, device=x_TD.device) * L)[:, None, None]
        expert_BEL = torch.arange(E, device=x_TD.device)[None, :, None].expand(B, E, L)
        token_S, expert_S = token_BEL[picked_BEL], expert_BEL[picked_BEL]
        order_S = torch.sort(token_S * E + expert_S).indices  # token-major order, for readability
        token_S, expert_S = token_S[order_S], expert_S[order_S]

        if self.gating == "pre_softmax":
            weight_S = probs_TE[token_S, expert_S]
        elif self.gating == "sigmoid":
            weight_S = logits_TE[token_S, expert_S].sigmoid()
        else:
            picked_TE = torch.zeros(T, E, dtype=torch.bool, device=x_TD.device)
            picked_TE[token_S, expert_S] = True
            # Softmax over each token's picking experts; unpicked entries are zeroed, never -inf (empty rows).
            safe_TE = logits_TE.masked_fill(~picked_TE, 0.0)
            shift_T = safe_TE.detach().masked_fill(~picked_TE, float("-inf")).amax(-1).nan_to_num(0.0, 0.0, 0.0)
            exp_TE = torch.exp(safe_TE - shift_T[:, None]) * picked_TE
            weight_TE = exp_TE / exp_TE.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
            weight_S = weight_TE[token_S, expert_S]

        aux_losses: dict[str, Tensor] = {}
        if self.z_loss_coef > 0:
            aux_losses["z"] = self.z_loss_coef * router_z_loss(logits_TE[real_T])
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
        return (
            f"{super().extra_repr()}, capacity_factor={self.capacity_factor}, gating={self.gating}, scope={self.scope}"
        )
