"""The router cases the shared contract suite runs over, and helpers to build a layer or a toy model from a case.

Every registered router needs at least one case here (test_every_router_has_a_case enforces it); options that change
the code path (balancing, capacity, gating, transport, rules) get their own case.
"""

from __future__ import annotations

import torch
from torch import nn

import routelab
from routelab.routing import router_class

D, F, E = 8, 6, 4

CASES = [
    ("topk", {}),
    ("topk", dict(k=1, capacity_factor=1.0, drop_policy="position")),
    ("topk", dict(score="sigmoid", balance="loss_free", n_group=2, topk_group=1, scaling=2.5)),
    ("topk", dict(balance="bip")),
    ("expert_choice", {}),
    ("expert_choice", dict(gating="post_softmax", scope="batch", capacity_factor=1.0)),
    ("expert_choice", dict(gating="sigmoid", schedule="linear_reverse", k_min=1, k_max=3)),
    ("sinkhorn", dict(p=1.0, xi=0.5)),
    ("sinkhorn", dict(p=1.0, k=1, balanced=True, gate_from="scores")),
    ("null_experts", dict(num_null_experts=2, k=2)),
    ("null_experts", dict(num_null_experts=1, k=3, separate_null_gate=False)),
    ("top_p", {}),
    ("top_p", dict(p=0.7, rule="reach", normalize="selected", num_null_experts=1, num_fixed=1)),
    ("top_p", dict(p=0.75, rule="within", min_k=2, entropy="tsallis", entropy_threshold=0.9, dyn_loss_coef=0.01)),
    ("cosine", {}),
    ("cosine", dict(k=2, d_space=4, centroid_init="normal")),
    ("hash", {}),
    ("random_fixed", {}),
    ("random_fixed", dict(k=2, normalize="selected")),
    ("kmeans", {}),
    ("kmeans", dict(k=1, weighting="softmax", init="random", reseed_after=1)),
    ("recurrent", dict(hidden=16)),
    ("recurrent", dict(hidden=16, cell="rnn", k=1)),
    ("pregate", {}),
    ("pregate", dict(k=1, aux_loss_coef=0.0)),
    ("similarity", {}),
    ("similarity", dict(kernel="cosine", causal=False, k=1)),
    ("dtr", {}),
    ("dtr", dict(active_fraction=0.25, reverse=True)),
    ("condition_aware", {}),
    ("condition_aware", dict(k=1, time_dim=4, normalize="none", aux_loss_coef=0.0)),
    ("prototype", {}),
    ("prototype", dict(k=1, rcl_coef=0.5, aux_loss_coef=0.0, temperature=3.0)),
]

IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]


def make_routers(name: str, options: dict, n: int, *, d_model: int = D, num_experts: int = E) -> list[routelab.Router]:
    """n routers of one model: the shared modules are built once and handed to each."""
    shared = router_class(name).shared_modules(d_model=d_model, num_experts=num_experts, **options)
    return [
        routelab.create_router(name, d_model=d_model, num_experts=num_experts, **{**options, **shared})
        for _ in range(n)
    ]


def make_layer(name: str, options: dict, *, d_model: int = D, num_experts: int = E) -> routelab.MoELayer:
    (router,) = make_routers(name, options, 1, d_model=d_model, num_experts=num_experts)
    return routelab.MoELayer(d_model, F, router)


def make_ctx(B: int, L: int, seed: int = 0, **fields) -> routelab.RoutingContext:
    """A context with what any router may need: token ids, per-sample timesteps, step and layer."""
    g = torch.Generator().manual_seed(seed)
    defaults = dict(
        token_ids=torch.randint(0, 50, (B, L), generator=g),
        timestep=torch.rand(B, generator=g),
        step=0,
        layer_index=0,
    )
    defaults.update(fields)
    return routelab.RoutingContext(**defaults)


class ToyModel(nn.Module):
    """Residual stack of MoE layers, handing each layer's decision state to the next (recurrent routers)."""

    def __init__(self, name: str, options: dict, num_layers: int = 2, *, d_model: int = D, num_experts: int = E):
        super().__init__()
        routers = make_routers(name, options, num_layers, d_model=d_model, num_experts=num_experts)
        self.layers = nn.ModuleList(routelab.MoELayer(d_model, 2 * F, r) for r in routers)

    def forward(self, x, ctx):
        h, state = x, None
        for i, layer in enumerate(self.layers):
            y, decision = layer.forward_with_decision(h, ctx.replace(state=state, layer_index=i))
            h, state = h + y, decision.state
        return h
