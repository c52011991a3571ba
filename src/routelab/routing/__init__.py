"""Routers and the routing contract. Importing this package registers every built-in router."""

from routelab.routing.base import Router, RoutingContext, RoutingDecision, update_routers
from routelab.routing.registry import create_router, list_routers, register_router, router_class, router_options
from routelab.routing.topk import TopKRouter
from routelab.routing import (  # noqa: F401  (importing a family registers its routers)
    condition_aware,
    cosine,
    denoising_task,
    expert_choice,
    hashing,
    kmeans,
    null_experts,
    pregate,
    prototype,
    random_fixed,
    recurrent,
    similarity,
    sinkhorn,
    top_p,
)

__all__ = [
    "Router",
    "RoutingContext",
    "RoutingDecision",
    "TopKRouter",
    "create_router",
    "list_routers",
    "register_router",
    "router_class",
    "router_options",
    "update_routers",
]
