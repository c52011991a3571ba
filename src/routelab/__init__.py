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

# Loaded on first use, so that `import routelab` does not import safetensors/tokenizers.
_LAZY = {
    "save_model": "routelab.models.io",
    "load_model": "routelab.models.io",
    "ModelFolderError": "routelab.models.io",
    "generate": "routelab.models.decoding",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'routelab' has no attribute {name!r}")


__all__ = [
    "ModelFolderError",
    "MoELayer",
    "Router",
    "RoutingContext",
    "RoutingDecision",
    "SwiGLUExperts",
    "create_router",
    "generate",
    "list_routers",
    "load_model",
    "register_router",
    "save_model",
    "total_aux_loss",
    "update_routers",
]
