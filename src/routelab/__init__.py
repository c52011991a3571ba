"""routelab: dynamic routing for Mixture-of-Experts models, behind one contract."""

from routelab.experts import SwiGLUExperts
from routelab.layers import MoELayer, total_aux_loss
from routelab.routing import (
    Router,
    RoutingContext,
    RoutingDecision,
    create_router,
    list_routers,
    register_router,
    update_routers,
)

__version__ = "0.1.0"

__all__ = [
    "MoELayer",
    "Router",
    "RoutingContext",
    "RoutingDecision",
    "SwiGLUExperts",
    "create_router",
    "list_routers",
    "register_router",
    "total_aux_loss",
    "update_routers",
]
