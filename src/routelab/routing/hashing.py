"""Hash routing: the expert is a fixed function of the token id.

Paper: Equifinality in Mixture of Experts: Routing Topology Does Not Determine Language Modeling Quality (the hash
baseline); hash layers as in Roller et al., Hash Layers For Large Sparse Models (2021).

Defining property: a token id gets the same expert in any context, in any process; the router has no parameters
and training changes no decision. Uniformly drawn ids give binomially balanced loads.

Algorithm: expert = h(token_id, seed) mod E, k = 1, weight 1, with h a stable integer hash (a 31-bit
multiply-xorshift mix computed in int64 without overflow; Python's salted hash() is never used). Ids come from
`ctx.token_ids`; a missing field raises an error naming it. Hashing (layer, position, seed) would be a different
baseline and is not this router.

Options (keyword-only) and defaults: seed=0.

Our reconstruction: the hash function and k = 1 with weight 1 (the paper's exact hash is not specified).
"""

from __future__ import annotations

import torch
from torch import Tensor

from routelab._checks import check_int
from routelab.routing._util import mix64, real_mask
from routelab.routing.base import Router, RoutingContext, RoutingDecision, router_dtype
from routelab.routing.registry import register_router

_M31 = (1 << 31) - 1


def hash_ids(ids: Tensor, seed: int) -> Tensor:
    """LongTensor like `ids`: a stable 31-bit hash of each id (no overflow: every product stays below 2**62)."""
    salt = mix64(seed) & _M31
    h = (ids.long() & _M31) ^ salt
    for mult in (0x2C1B3C6D, 0x297A2D39, 0x6B43A9B5):
        h = (h ^ (h >> 15)) & _M31
        h = (h * mult) & _M31
    return h ^ (h >> 13)


@register_router("hash")
class HashRouter(Router):
    """expert = h(token_id, seed) mod E, one expert per token with weight 1."""

    causal = True

    def __init__(self, *, d_model: int, num_experts: int, seed: int = 0) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        check_int("seed", seed, 0)
        self.seed = seed

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        T, E = x_TD.shape[0], self.num_experts
        if ctx is None or ctx.token_ids is None:
            raise ValueError("hash routing needs RoutingContext.token_ids (the input ids); none were given")
        ids_T = ctx.token_ids.reshape(-1).to(x_TD.device)
        if ids_T.numel() != T:
            raise ValueError(f"RoutingContext.token_ids has {ids_T.numel()} ids but the input has {T} tokens")
        real_T = real_mask(ctx, T, x_TD.device)
        token_S = torch.arange(T, device=x_TD.device)[real_T]
        expert_S = hash_ids(ids_T[real_T], self.seed) % E
        weight_S = torch.ones(token_S.numel(), dtype=router_dtype(x_TD), device=x_TD.device)
        return RoutingDecision(
            token_index=token_S, expert_index=expert_S, weight=weight_S, num_tokens=T, num_experts=E
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}"
