"""A short demonstration: build an MoE layer, train it on a random regression task, print routing statistics."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from routelab.layers.moe import MoELayer, total_aux_loss
from routelab.routing.base import RoutingContext, update_routers
from routelab.routing.registry import create_router, router_options


def run_demo(*, router: str = "topk", steps: int = 50, num_experts: int = 8, k: int = 2, seed: int = 0) -> dict:
    """Fit an MoE layer to a fixed random teacher MLP; returns the first and last loss and the expert loads.

    `k` goes to routers that have a `k` option. The tokens are given random ids (routers such as `hash` read them).
    Raises ValueError (naming the option) for a router or option that cannot be built.
    """
    torch.manual_seed(seed)
    d_model, d_ff, tokens, vocab = 32, 64, 512, 1000
    options = {"k": k} if "k" in router_options(router) else {}
    required = [name for name, default in router_options(router).items() if default is inspect.Parameter.empty]
    missing = sorted(set(required) - set(options))
    if missing:
        raise ValueError(f"router {router!r} needs option(s) {', '.join(missing)}, which the demo does not set")
    layer = MoELayer(d_model, d_ff, create_router(router, d_model=d_model, num_experts=num_experts, **options))
    teacher = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
    optimizer = torch.optim.AdamW(layer.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        x = torch.randn(tokens, d_model)
        ctx = RoutingContext(token_ids=torch.randint(0, vocab, (tokens,)))
        with torch.no_grad():
            target = teacher(x)
        loss = nn.functional.mse_loss(layer(x, ctx), target)
        (loss + total_aux_loss(layer)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_routers(layer)
        losses.append(loss.item())
    decision = layer.last_decision
    load = decision.expert_load().float()
    return {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "expert_load": decision.expert_load().tolist(),
        "load_max_over_mean": (load.max() / load.mean()).item(),
        "mean_experts_per_token": decision.experts_per_token().float().mean().item(),
        "aux_losses": {name: value.item() for name, value in decision.aux_losses.items()},
    }


def print_demo(stats: dict) -> None:
    print(f"loss: {stats['first_loss']:.4f} -> {stats['last_loss']:.4f}")
    print(f"expert load: {stats['expert_load']}  (max/mean {stats['load_max_over_mean']:.2f})")
    print(f"mean experts per token: {stats['mean_experts_per_token']:.2f}")
    for name, value in stats["aux_losses"].items():
        print(f"aux loss {name}: {value:.5f}")
