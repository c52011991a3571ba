"""Denoising Task Routing: fixed, timestep-dependent channel masks — no learned router, no parameters.

Paper: Denoising Task Routing for Diffusion Models (Park et al., ICLR 2024).

Defining property: the active channels are a fixed function of the diffusion time t alone — a contiguous window of
channels that slides across the width as t goes from 0 to 1, so that nearby timesteps (similar denoising tasks)
share most of their channels and distant ones share few. Nothing is learned: the router has no parameters and no
buffers, and training changes no decision; every token of a sequence gets the same channels.

Algorithm (here over the FFN's hidden channels, in E equal groups — the experts of the MoE layer, each a slice of
the FFN's width — so the mask is a choice of k adjacent experts, each with weight 1):
    k = max(1, round(active_fraction · E))                     (the active share of the width, DTR's α)
    start(t) = min(floor((E - k + 1) · t), E - k)              (E - k + 1 equal intervals of t, one window each)
    experts(t) = start(t), start(t) + 1, ..., start(t) + k - 1;  weight 1
t is ctx.timestep (one per sequence, in [0, 1]); without one the router raises. `mask(t)` gives the [E] 0/1 mask.

Options (keyword-only) and defaults: active_fraction=0.5, reverse=False (True: the window slides the other way,
start(t) = E - k - start(t)).

Reconstructed (not the authors' code): the paper masks the channels of each transformer block's output with a
sliding window over a discrete timestep index; here the window slides over groups of FFN hidden channels (an expert
is a group), over continuous t, with the interval rule above. α = 0.5 is our default, not the paper's tuned value.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from routelab._checks import check_number
from routelab.routing._util import real_mask, token_timesteps
from routelab.routing.base import Router, RoutingContext, RoutingDecision, router_dtype
from routelab.routing.registry import register_router


@register_router("dtr")
class DenoisingTaskRouter(Router):
    """A sliding window of k adjacent channel-group experts chosen by the diffusion time t; no parameters."""

    causal = True  # a token's experts depend only on its sequence's t
    needs_timestep = True

    def __init__(self, *, d_model: int, num_experts: int, active_fraction: float = 0.5, reverse: bool = False) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        check_number("active_fraction", active_fraction, low=0, high=1, open_low=True)
        if not isinstance(reverse, bool):
            raise ValueError(f"reverse must be true or false, got {reverse!r}")
        self.active_fraction, self.reverse = float(active_fraction), reverse
        self.k = max(1, round(active_fraction * num_experts))

    def window_start(self, t: Tensor) -> Tensor:
        """LongTensor like t: the first active expert at each time t in [0, 1]."""
        E, k = self.num_experts, self.k
        start = torch.floor((E - k + 1) * t.double()).long().clamp(0, E - k)
        return (E - k) - start if self.reverse else start

    def mask(self, t: float) -> Tensor:
        """FloatTensor [E]: 1 on the experts (channel groups) active at time t, 0 elsewhere."""
        if not (isinstance(t, (int, float)) and math.isfinite(t) and 0 <= t <= 1):
            raise ValueError(f"t must be a number in [0, 1], got {t!r}")
        start = int(self.window_start(torch.tensor([float(t)]))[0])
        m = torch.zeros(self.num_experts)
        m[start : start + self.k] = 1.0
        return m

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        T, E, k = x_TD.shape[0], self.num_experts, self.k
        t_T = token_timesteps(ctx, T, x_TD.device, router="dtr")
        real_T = real_mask(ctx, T, x_TD.device)
        expert_TK = self.window_start(t_T)[:, None] + torch.arange(k, device=x_TD.device)
        token_S = torch.arange(T, device=x_TD.device)[:, None].expand(T, k)[real_T]
        expert_S = expert_TK[real_T]
        return RoutingDecision(
            token_index=token_S.reshape(-1),
            expert_index=expert_S.reshape(-1),
            weight=torch.ones(expert_S.numel(), dtype=router_dtype(x_TD), device=x_TD.device),
            num_tokens=T,
            num_experts=E,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, active_fraction={self.active_fraction}, reverse={self.reverse}"
